#include "checkpoint/checkpoint.h"

#include <cstring>
#include <filesystem>
#include <map>
#include <sstream>

#include "checkpoint/hdf5_util.h"
#include "core/version.h"
#include "parallel/tensor_parallel.h"
#include "trainer/trainer.h"

namespace decotron {

namespace fs = std::filesystem;

namespace {

constexpr const char* kFormatName = "decotron-checkpoint";

CheckpointTensor capture_tensor(const Parameter& p, const Tensor& t) {
  DT_ASSERT(t.dtype() == DType::f32, "checkpoint tensors are fp32 masters; ", p.name, " is ", dtype_name(t.dtype()));
  CheckpointTensor c{p.name, t.shape(), {}, p.partition, p.expert_block, p.trainable, p.weight_decay};
  Tensor host = t.device() == Device::cpu ? t : t.to(Device::cpu);
  const float* src = host.data<float>();
  c.data.assign(src, src + host.numel());
  return c;
}

// The whole tensor from this rank's shard of it: experts are gathered over the expert-parallel
// group (the blocks of this tensor-parallel slice, in rank order), then every split tensor over
// the tensor-parallel group.
Tensor whole_tensor(const Parameter& p, const Tensor& t, Communicator* tp, Communicator* ep) {
  if (p.shard_dim < 0) return t;
  Tensor host = t.device() == Device::cpu ? t : t.to(Device::cpu);
  if (ep && ep->size() > 1 && is_expert_partition(p.partition)) host = tp_gather_shards(*ep, host, p.shard_dim);
  if (tp && tp->size() > 1) host = tp_gather_shards(*tp, host, p.shard_dim);
  DT_ASSERT(host.dim(p.shard_dim) == p.global_shape[p.shard_dim], p.name, " is split but the groups given do not "
            "gather it whole");
  return host;
}

// `src` as a host tensor of the parameter's local shape and dtype: this rank's shard of it when
// the parameter is split.
Tensor local_part(const CheckpointTensor& src, const Parameter& p) {
  Tensor host = Tensor::empty(src.shape, DType::f32);
  std::memcpy(host.data<float>(), src.data.data(), src.data.size() * sizeof(float));
  if (p.shard_dim >= 0) host = slice_shard(host, Shard{p.shard_dim, p.shard_start, p.value.dim(p.shard_dim)});
  // Models in another dtype (fp64 gradient checks, bf16 inference) get a converted copy.
  return p.value.dtype() == DType::f32 ? host : cast_cpu(host, p.value.dtype());
}

Partition partition_of(const std::string& name) {
  for (Partition p : {Partition::replicated, Partition::column, Partition::row, Partition::vocab,
                      Partition::expert_rows, Partition::expert_cols, Partition::expert_entries})
    if (name == partition_name(p)) return p;
  fail("unknown partition '", name, "'");
}

void write_tensor(hid_t group, const CheckpointTensor& t, bool with_meta) {
  h5::Handle ds = h5::write_f32(group, t.name, t.shape, t.data.data());
  if (!with_meta) return;
  h5::set_attr(ds, "partition", std::string(partition_name(t.partition)));
  h5::set_attr(ds, "expert_block", t.expert_block);
  h5::set_attr(ds, "trainable", static_cast<int64_t>(t.trainable));
  h5::set_attr(ds, "weight_decay", static_cast<int64_t>(t.weight_decay));
}

CheckpointTensor read_tensor(hid_t group, const std::string& name, bool with_meta) {
  CheckpointTensor t;
  t.name = name;
  t.data = h5::read_f32(group, name, &t.shape);
  if (with_meta) {
    h5::Handle ds(H5_CHECK(H5Dopen2(group, name.c_str(), H5P_DEFAULT)), H5Dclose);
    t.partition = partition_of(h5::get_attr_string(ds, "partition"));
    t.expert_block = h5::get_attr_int(ds, "expert_block");
    t.trainable = h5::get_attr_int(ds, "trainable") != 0;
    t.weight_decay = h5::get_attr_int(ds, "weight_decay") != 0;
  }
  return t;
}

// Checks that the checkpoint holds exactly the model's parameters with the same shapes, then
// calls apply(i, tensor) for each model parameter i. Nothing is applied unless all match.
template <class Apply>
void match_parameters(const std::vector<Parameter*>& params, const std::vector<CheckpointTensor>& tensors,
                      const std::string& path, Apply apply) {
  std::map<std::string, const CheckpointTensor*> by_name;
  for (const CheckpointTensor& t : tensors) by_name[t.name] = &t;
  const char* fix =
      "; resume with the config stored in the checkpoint (`decotron train --resume DIR` without --config uses it), "
      "or start a new run directory for a different model";
  std::vector<const CheckpointTensor*> matched;
  for (const Parameter* p : params) {
    auto it = by_name.find(p->name);
    if (it == by_name.end())
      fail("checkpoint ", path, " has no parameter '", p->name, "' (shape ", shape_str(p->global_shape),
           " in this model): it was written by a different model", fix);
    // Whole tensors in any layout: a tensor-parallel rank compares the whole shape.
    if (it->second->shape != p->global_shape)
      fail("checkpoint ", path, ": parameter '", p->name, "' has shape ", shape_str(it->second->shape),
           " in the checkpoint but ", shape_str(p->global_shape), " in this model", fix);
    matched.push_back(it->second);
    by_name.erase(it);
  }
  if (!by_name.empty())
    fail("checkpoint ", path, " has parameter '", by_name.begin()->first, "' (shape ",
         shape_str(by_name.begin()->second->shape), ") that this model lacks (", by_name.size(),
         " extra in all): it was written by a different model", fix);
  for (size_t i = 0; i < params.size(); ++i) apply(i, *matched[i]);
}

}  // namespace

CheckpointData capture_checkpoint(Trainer& trainer) {
  CheckpointData d;
  AdamW& opt = trainer.optimizer();
  const std::vector<Parameter*>& params = opt.params();
  // Under tensor and expert parallelism every rank of the groups must be here: split tensors are
  // gathered. Under the distributed optimizer every data-parallel rank too: moments() gathers
  // the shards.
  Communicator* tp = trainer.parallel().tp.get();
  Communicator* ep = trainer.parallel().ep.get();
  const std::vector<AdamW::Moments> moments = opt.moments();
  for (size_t i = 0; i < params.size(); ++i) {
    d.model.push_back(capture_tensor(*params[i], whole_tensor(*params[i], params[i]->value, tp, ep)));
    d.exp_avg.push_back(capture_tensor(*params[i], whole_tensor(*params[i], moments[i].exp_avg, tp, ep)));
    d.exp_avg_sq.push_back(capture_tensor(*params[i], whole_tensor(*params[i], moments[i].exp_avg_sq, tp, ep)));
  }
  d.optimizer_step = opt.step();
  d.state = trainer.state();
  d.sparsity_lambda = trainer.controller().lambda();
  d.seed = trainer.config().train.seed;
  d.config_yaml = config_to_yaml(trainer.config());
  d.decotron_version = kVersion;
  return d;
}

void write_checkpoint(const CheckpointData& d, const std::string& path) {
  auto lock = h5::hdf5_lock();
  try {
    h5::Handle file = h5::create_file(path);
    h5::set_attr(file, "format", std::string(kFormatName));
    h5::set_attr(file, "format_version", kCheckpointFormatVersion);
    h5::set_attr(file, "decotron_version", std::string(kVersion));
    h5::set_attr(file, "hdf5_version", h5::library_version());
    h5::set_attr(file, "iteration", d.state.iteration);  // for tools that only want the label
    h5::write_text(file, "config", d.config_yaml);
    // The parameter list, in the model's creation order: a reader can tell a complete file from
    // one that lost a dataset, without knowing the model.
    std::string names;
    for (const CheckpointTensor& t : d.model) names += t.name + "\n";
    h5::write_text(file, "parameter_names", names);
    {
      h5::Handle model = h5::create_group(file, "model");
      for (const CheckpointTensor& t : d.model) write_tensor(model, t, true);
    }
    {
      h5::Handle opt = h5::create_group(file, "optimizer");
      h5::set_attr(opt, "type", std::string("adamw"));
      h5::set_attr(opt, "step", d.optimizer_step);
      h5::Handle m = h5::create_group(opt, "exp_avg"), v = h5::create_group(opt, "exp_avg_sq");
      for (const CheckpointTensor& t : d.exp_avg) write_tensor(m, t, false);
      for (const CheckpointTensor& t : d.exp_avg_sq) write_tensor(v, t, false);
    }
    {
      h5::Handle st = h5::create_group(file, "train_state");
      h5::set_attr(st, "iteration", d.state.iteration);
      h5::set_attr(st, "consumed_samples", d.state.consumed_samples);
      h5::set_attr(st, "skipped_total", d.state.skipped_total);
      h5::set_attr(st, "consecutive_skips", d.state.consecutive_skips);
      h5::set_attr(st, "sparsity_lambda", d.sparsity_lambda);
      // The seed is a uint64; HDF5 attributes here are int64, and the cast round-trips exactly.
      h5::set_attr(st, "seed", static_cast<int64_t>(d.seed));
      const auto& g = d.state.recent_grad_norms;
      h5::write_f64(st, "recent_grad_norms", {static_cast<int64_t>(g.size())}, g.data());
    }
    h5::close_file(file);
  } catch (const Error& e) {
    fail("cannot write checkpoint ", path, ": ", e.what(), " (check free disk space and permissions)");
  }
}

CheckpointData read_checkpoint(const std::string& path, bool weights_only) {
  auto lock = h5::hdf5_lock();
  CheckpointData d;
  try {
    if (!fs::is_regular_file(path)) fail("no such file");
    h5::Handle file = h5::open_file(path);
    if (h5::get_attr_string(file, "format") != kFormatName) fail("not a Decotron checkpoint");
    d.format_version = h5::get_attr_int(file, "format_version");
    d.decotron_version = h5::get_attr_string(file, "decotron_version");
    d.hdf5_version = h5::get_attr_string(file, "hdf5_version");
    if (d.format_version > kCheckpointFormatVersion)
      fail("format version ", d.format_version, " (written by decotron ", d.decotron_version,
           ") is newer than this decotron reads (", kCheckpointFormatVersion, "); upgrade decotron");
    d.config_yaml = h5::read_text(file, "config");
    std::vector<std::string> names;
    {
      std::istringstream list(h5::read_text(file, "parameter_names"));
      for (std::string n; std::getline(list, n);) names.push_back(n);
      h5::Handle model = h5::open_group(file, "model");
      for (const std::string& n : names) d.model.push_back(read_tensor(model, n, true));
      if (h5::list_group(model).size() != names.size())
        fail("/model holds datasets that /parameter_names does not list: the file is corrupt");
    }
    {
      h5::Handle opt = h5::open_group(file, "optimizer");
      d.optimizer_step = h5::get_attr_int(opt, "step");
      if (!weights_only) {
        h5::Handle m = h5::open_group(opt, "exp_avg"), v = h5::open_group(opt, "exp_avg_sq");
        for (const std::string& n : names) {
          d.exp_avg.push_back(read_tensor(m, n, false));
          d.exp_avg_sq.push_back(read_tensor(v, n, false));
        }
      }
    }
    {
      h5::Handle st = h5::open_group(file, "train_state");
      d.state.iteration = h5::get_attr_int(st, "iteration");
      d.state.consumed_samples = h5::get_attr_int(st, "consumed_samples");
      d.state.skipped_total = h5::get_attr_int(st, "skipped_total");
      d.state.consecutive_skips = h5::get_attr_int(st, "consecutive_skips");
      d.sparsity_lambda = h5::get_attr_double(st, "sparsity_lambda");
      d.seed = static_cast<uint64_t>(h5::get_attr_int(st, "seed"));
      d.state.recent_grad_norms = h5::read_f64(st, "recent_grad_norms");
    }
    h5::close_file(file);
  } catch (const Error& e) {
    fail("checkpoint ", path, ": ", e.what());
  }
  return d;
}

void restore_checkpoint(Trainer& trainer, const CheckpointData& d, const std::string& path) {
  AdamW& opt = trainer.optimizer();
  if (d.exp_avg.size() != d.model.size() || d.exp_avg_sq.size() != d.model.size())
    fail("checkpoint ", path, " was read without its optimizer state; read it with weights_only = false");
  // The moments were read in the file's model order, so they pair with d.model by index.
  std::map<std::string, size_t> index;
  for (size_t i = 0; i < d.model.size(); ++i) index[d.model[i].name] = i;
  match_parameters(opt.params(), d.model, path, [&](size_t i, const CheckpointTensor& t) {
    const size_t k = index.at(t.name);
    Parameter& p = *opt.params()[i];
    p.value.copy_from(local_part(t, p));
    // Whole tensors in the file; the distributed optimizer keeps its shard of them.
    opt.set_moments(i, local_part(d.exp_avg[k], p), local_part(d.exp_avg_sq[k], p));
  });
  opt.set_step(d.optimizer_step);
  trainer.model().params().mark_master_changed();
  trainer.state() = d.state;
  trainer.controller().set_lambda(d.sparsity_lambda);
}

void save_checkpoint(Trainer& trainer, const std::string& path) { write_checkpoint(capture_checkpoint(trainer), path); }

void load_checkpoint(Trainer& trainer, const std::string& path) {
  restore_checkpoint(trainer, read_checkpoint(path), path);
}

Config read_checkpoint_config(const std::string& path) {
  std::string text;
  {
    auto lock = h5::hdf5_lock();
    try {
      if (!fs::is_regular_file(path)) fail("no such file");
      h5::Handle file = h5::open_file(path);
      text = h5::read_text(file, "config");
      h5::close_file(file);
    } catch (const Error& e) {
      fail("checkpoint ", path, ": ", e.what());
    }
  }
  return config_from_yaml(text, path + ":/config");
}

void load_model_weights(Transformer& model, const std::string& path) {
  CheckpointData d = read_checkpoint(path, true);
  std::vector<Parameter*> params = model.params().all();
  match_parameters(params, d.model, path,
                   [&](size_t i, const CheckpointTensor& t) { params[i]->value.copy_from(local_part(t, *params[i])); });
}

}  // namespace decotron

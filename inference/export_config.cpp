// config.json of an export, written and read through ModelConfig's field table (so a new
// model field is exported without touching this file).
#include "inference/export_config.h"

#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "core/error.h"
#include "inference/export.h"

namespace decotron::inference {

using json = nlohmann::ordered_json;

const char* export_dtype_name(FileDType t) {
  switch (t) {
    case FileDType::f32: return "fp32";
    case FileDType::f16: return "fp16";
    case FileDType::bf16: return "bf16";
    case FileDType::i8: return "int8";
  }
  return "?";
}

namespace {

struct ToJson {
  json& j;
  template <class T> void operator()(const char* name, T& value, const char*) { j[name] = value; }
  template <class T> void operator()(const char* name, T& value, const char* doc, std::initializer_list<const char*>) {
    (*this)(name, value, doc);
  }
};

struct FromJson {
  const json& j;
  const std::string& file;
  std::set<std::string> seen;
  template <class T> void operator()(const char* name, T& value, const char* doc, std::initializer_list<const char*>) {
    (*this)(name, value, doc);
  }
  template <class T> void operator()(const char* name, T& value, const char*) {
    seen.insert(name);
    if (!j.contains(name)) fail(file, ": model.", name, " is missing; re-export the model with this decotron");
    try {
      value = j.at(name).get<T>();
    } catch (const json::exception&) {
      fail(file, ": model.", name, " has the wrong type (", j.at(name).dump(), ")");
    }
  }
};

template <class T> T get_key(const json& j, const char* key, const std::string& file) {
  if (!j.contains(key)) fail(file, ": key '", key, "' is missing");
  try {
    return j.at(key).get<T>();
  } catch (const json::exception&) {
    fail(file, ": key '", key, "' has the wrong type (", j.at(key).dump(), ")");
  }
}

}  // namespace

std::string export_info_to_json(const ExportInfo& info) {
  json j;
  j["format"] = kExportFormatName;
  j["format_version"] = kExportFormatVersion;
  json m = json::object();
  ToJson tj{m};
  ModelConfig mc = info.model;
  mc.fields(tj);
  j["model"] = m;
  j["weights"] = {{"file", "model.safetensors"},
                  {"dtype", export_dtype_name(info.dtype)},
                  {"int8", info.int8},
                  {"vector_dtype", "fp32"},
                  {"router_dtype", "fp32"}};
  j["tokenizer"] = {{"file", "tokenizer.model"},
                    {"vocab_size", info.tokenizer_vocab},
                    {"eod_id", info.eod_id},
                    {"bos_id", info.bos_id},
                    {"pad_id", info.pad_id}};
  j["context_length"] = info.model.seq_len;
  return j.dump(2);
}

ExportInfo read_export_info(const std::string& path) {
  std::ifstream in(path);
  if (!in) fail(path, ": cannot open (is this a `decotron export` directory?)");
  json j;
  try {
    j = json::parse(in);
  } catch (const json::exception& e) {
    fail(path, ": not valid JSON (", e.what(), ")");
  }
  if (!j.is_object()) fail(path, ": expected a JSON object");
  const std::string fmt = get_key<std::string>(j, "format", path);
  if (fmt != kExportFormatName) fail(path, ": format is '", fmt, "', expected '", kExportFormatName, "'");
  ExportInfo info;
  info.format_version = get_key<int>(j, "format_version", path);
  if (info.format_version != kExportFormatVersion)
    fail(path, ": format_version ", info.format_version, " is not supported (this decotron reads version ",
         kExportFormatVersion, ")");
  if (!j.contains("model") || !j["model"].is_object()) fail(path, ": key 'model' is missing or not an object");
  FromJson fj{j["model"], path, {}};
  info.model.fields(fj);
  for (const auto& [k, v] : j["model"].items())
    if (!fj.seen.count(k)) fail(path, ": unknown key model.", k, " (written by a newer decotron?)");
  try {
    Config c;
    c.model = info.model;
    c.source = path;
    validate_config(c);
  } catch (const Error& e) {
    fail(path, ": invalid model shape: ", e.what());
  }
  if (!j.contains("weights") || !j["weights"].is_object()) fail(path, ": key 'weights' is missing");
  const json& w = j["weights"];
  const std::string dt = get_key<std::string>(w, "dtype", path);
  if (dt == "bf16") info.dtype = FileDType::bf16;
  else if (dt == "fp16") info.dtype = FileDType::f16;
  else if (dt == "fp32") info.dtype = FileDType::f32;
  else fail(path, ": weights.dtype '", dt, "' is unknown (bf16, fp16 or fp32)");
  info.int8 = get_key<bool>(w, "int8", path);
  if (!j.contains("tokenizer") || !j["tokenizer"].is_object()) fail(path, ": key 'tokenizer' is missing");
  const json& t = j["tokenizer"];
  info.tokenizer_vocab = get_key<int64_t>(t, "vocab_size", path);
  info.eod_id = get_key<int32_t>(t, "eod_id", path);
  info.bos_id = get_key<int32_t>(t, "bos_id", path);
  info.pad_id = get_key<int32_t>(t, "pad_id", path);
  if (info.tokenizer_vocab > info.model.vocab_size)
    fail(path, ": tokenizer.vocab_size ", info.tokenizer_vocab, " exceeds model.vocab_size ", info.model.vocab_size);
  return info;
}

}  // namespace decotron::inference

#include "parallel/communicator.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <thread>

#include "core/error.h"

namespace decotron {

size_t comm_type_size(CommType t) { return t == CommType::f32 ? 4 : t == CommType::bf16 ? 2 : 8; }

CommType comm_type_of(DType t) {
  switch (t) {
    case DType::f32: return CommType::f32;
    case DType::f64: return CommType::f64;
    case DType::bf16: return CommType::bf16;
    default: fail("collectives move fp32, fp64 or bf16 tensors, not ", dtype_name(t));
  }
}

const char* comm_type_name(CommType t) {
  switch (t) {
    case CommType::f32: return "fp32";
    case CommType::f64: return "fp64";
    case CommType::i64: return "i64";
    case CommType::bf16: return "bf16";
  }
  return "?";
}

uint64_t CommTraffic::bytes(const std::string& group) const {
  uint64_t b = 0;
  if (auto it = groups.find(group); it != groups.end())
    for (const auto& [op, c] : it->second) b += c.bytes;
  return b;
}

uint64_t CommTraffic::total_bytes() const {
  uint64_t b = 0;
  for (const auto& [g, ops] : groups) b += bytes(g);
  return b;
}

uint64_t CommTraffic::total_calls() const {
  uint64_t n = 0;
  for (const auto& [g, ops] : groups)
    for (const auto& [op, c] : ops) n += c.calls;
  return n;
}

CommTraffic CommTraffic::since(const CommTraffic& before) const {
  CommTraffic d;
  for (const auto& [g, ops] : groups)
    for (const auto& [op, c] : ops) {
      Count b;
      if (auto gi = before.groups.find(g); gi != before.groups.end())
        if (auto oi = gi->second.find(op); oi != gi->second.end()) b = oi->second;
      if (c.calls > b.calls) d.groups[g][op] = Count{c.bytes - b.bytes, c.calls - b.calls};
    }
  return d;
}

namespace {
std::string byte_text(uint64_t b) {
  char buf[32];
  if (b >= (1ull << 30)) std::snprintf(buf, sizeof buf, "%.2f GiB", b / double(1ull << 30));
  else if (b >= (1ull << 20)) std::snprintf(buf, sizeof buf, "%.2f MiB", b / double(1ull << 20));
  else if (b >= (1ull << 10)) std::snprintf(buf, sizeof buf, "%.2f KiB", b / double(1ull << 10));
  else std::snprintf(buf, sizeof buf, "%llu B", static_cast<unsigned long long>(b));
  return buf;
}
}  // namespace

std::string CommTraffic::summary() const {
  std::string parts;
  for (const auto& [g, ops] : groups) parts += cat(parts.empty() ? "" : ", ", g, " ", byte_text(bytes(g)));
  return cat(byte_text(total_bytes()), " in ", total_calls(), " collectives", parts.empty() ? "" : " (" + parts + ")");
}

uint64_t CollectiveLog::begin(const std::string& group, int group_size, const char* op, size_t bytes,
                              size_t sent_bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  if (group_size > 1) {
    CommTraffic::Count& c = traffic_.groups[group][op];
    c.bytes += sent_bytes;
    ++c.calls;
  }
  Entry e;
  e.seq = next_seq_++;
  e.group = group;
  e.op = op;
  e.bytes = bytes;
  ring_.push_back(std::move(e));
  while (ring_.size() > capacity_) ring_.pop_front();
  return ring_.back().seq;
}

void CollectiveLog::end(uint64_t seq) {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = ring_.rbegin(); it != ring_.rend(); ++it)
    if (it->seq == seq) {
      it->done = true;
      return;
    }
}

CommTraffic CollectiveLog::traffic() const {
  std::lock_guard<std::mutex> lock(mu_);
  return traffic_;
}

std::vector<CollectiveLog::Entry> CollectiveLog::recent() const {
  std::lock_guard<std::mutex> lock(mu_);
  return {ring_.begin(), ring_.end()};
}

std::string CollectiveLog::format() const {
  std::string out;
  for (const Entry& e : recent())
    out += cat("    #", e.seq, " ", e.group, " ", e.op, " ", e.bytes, " bytes", e.done ? "" : "  <- not completed",
               "\n");
  return out;
}

void report_collective_timeout(const CollectiveLog& log, int world_rank, const std::string& group, const char* op,
                               uint64_t seq, double waited_s) {
  std::fprintf(stderr,
               "decotron: watchdog: rank %d: collective #%llu %s on group '%s' did not complete within %.1f s "
               "(parallel.timeout_s); a peer rank of group '%s' is hung, dead or issued a different collective. "
               "Aborting the job.\n"
               "  last collectives issued by rank %d (oldest first):\n%s"
               "  (every rank that reaches its deadline prints its own list: compare the sequence numbers; a "
               "rank that prints nothing is hung or dead)\n",
               world_rank, static_cast<unsigned long long>(seq), op, group.c_str(), waited_s, group.c_str(),
               world_rank, log.format().c_str());
  std::fflush(stderr);
  // Peers waiting in the same collective reach their deadline at about the same time: give
  // them a moment to print their lists before the abort tears the job down.
  std::this_thread::sleep_for(std::chrono::seconds(2));
}

void Communicator::all_reduce_host(void* buf, int64_t count, CommType type) {
  if (device() == Device::cpu) {
    all_reduce(buf, count, type);
    return;
  }
  const size_t bytes = count * comm_type_size(type);
  // Device staging: one device buffer of the same bytes.
  DeviceAllocator& a = allocator_for(device());
  void* dev = a.allocate(bytes);
  a.copy(dev, device(), buf, Device::cpu, bytes);
  all_reduce(dev, count, type);
  a.copy(buf, Device::cpu, dev, device(), bytes);
  a.release(dev, bytes);
}

double Communicator::sum(double v) {
  all_reduce_host(&v, 1, CommType::f64);
  return v;
}

int64_t Communicator::sum(int64_t v) {
  all_reduce_host(&v, 1, CommType::i64);
  return v;
}

void Communicator::sum_in_place(std::vector<double>& v) {
  if (!v.empty()) all_reduce_host(v.data(), static_cast<int64_t>(v.size()), CommType::f64);
}

void Communicator::sum_in_place(std::vector<int64_t>& v) {
  if (!v.empty()) all_reduce_host(v.data(), static_cast<int64_t>(v.size()), CommType::i64);
}

void Communicator::all_to_all_host(const std::vector<int64_t>& send, const std::vector<int64_t>& send_counts,
                                   std::vector<int64_t>& recv, const std::vector<int64_t>& recv_counts) {
  if (device() == Device::cpu) {
    all_to_all(send.data(), send_counts, recv.data(), recv_counts, CommType::i64);
    return;
  }
  const size_t sb = std::max<size_t>(send.size(), 1) * 8, rb = std::max<size_t>(recv.size(), 1) * 8;
  DeviceAllocator& a = allocator_for(device());
  void* ds = a.allocate(sb);
  void* dr = a.allocate(rb);
  if (!send.empty()) a.copy(ds, device(), send.data(), Device::cpu, send.size() * 8);
  all_to_all(ds, send_counts, dr, recv_counts, CommType::i64);
  if (!recv.empty()) a.copy(recv.data(), Device::cpu, dr, device(), recv.size() * 8);
  a.release(ds, sb);
  a.release(dr, rb);
}

}  // namespace decotron

// TEST-ONLY. The execution model of apd_emu/emu.h: fibers, the CTA scheduler,
// warp-collective resolution with mask checks, barriers, launch checks.
#include <atomic>
#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>

#include "apd_emu/runtime_api.h"

#if !defined(__x86_64__)
#error "the CUDA emulator's fiber switch is written for x86-64"
#endif

// void apd_emu_switch(void** save_sp, void* load_sp): saves the callee-saved
// registers, MXCSR and the x87 control word on the current stack, stores the
// stack pointer in *save_sp, and resumes the context saved at load_sp.
extern "C" void apd_emu_switch(void** save_sp, void* load_sp);
asm(R"(
.text
.globl apd_emu_switch
.type apd_emu_switch,@function
apd_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size apd_emu_switch, .-apd_emu_switch
.section .note.GNU-stack,"",@progbits
.text
)");

namespace apd_emu {

Fiber* g_fiber = nullptr;
uint3 g_block_idx{0, 0, 0};
dim3 g_block_dim{1, 1, 1}, g_grid_dim{1, 1, 1};

namespace {

enum State : int { kReady = 0, kAtWarp = 1, kAtBarrier = 2, kDone = 3 };

constexpr size_t kStackBytes = 256 * 1024;  // per thread (kernels keep arrays on the stack)
constexpr size_t kPage = 4096;

struct Launch {
  std::string kernel;
  std::vector<Fiber> fibers;
  std::vector<std::array<uint32_t, kMaxWords>> snapshots;  // [threads]: collective words, by warp
  const std::function<void()>* body = nullptr;
  void* sched_sp = nullptr;
  std::string error;
  uint64_t resolved = 0;
};

std::mutex g_mutex;  // one launch at a time (shared memory is per OS thread)
Launch* g_launch = nullptr;
int g_schedule = 0;
uint64_t g_seed = 0;
uint64_t g_last_resolved = 0;
thread_local cudaError_t g_last_error = cudaSuccess;
std::map<const void*, int> g_max_dyn_smem;

struct DynSmem {
  void* (*get)();
  const char* name;
};
std::vector<DynSmem>& dyn_smem() {
  static std::vector<DynSmem> v;
  return v;
}
size_t g_dyn_bytes = 0;  // of the running launch

// Stacks: one mmap'd arena with a PROT_NONE guard page under every stack.
struct Arena {
  unsigned char* base = nullptr;
  size_t n = 0;
  unsigned char* stack(size_t i) { return base + i * (kStackBytes + kPage) + kPage; }
  void ensure(size_t threads) {
    if (threads <= n) return;
    if (base) munmap(base, n * (kStackBytes + kPage));
    const size_t bytes = threads * (kStackBytes + kPage);
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw Error("apd_emu: cannot map fiber stacks");
    base = static_cast<unsigned char*>(p);
    n = threads;
    for (size_t i = 0; i < threads; ++i) mprotect(base + i * (kStackBytes + kPage), kPage, PROT_NONE);
  }
};
Arena g_arena;

std::string hex(unsigned m) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", m);
  return buf;
}

std::string kernel_name(const void* fn) {
  Dl_info info;
  if (dladdr(fn, &info) && info.dli_sname) {
    int status = 0;
    char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    std::string s = status == 0 && d ? d : info.dli_sname;
    std::free(d);
    return s;
  }
  std::ostringstream os;
  os << "kernel@" << fn;
  return os.str();
}

std::string where(const Launch& L, int warp) {
  std::ostringstream os;
  os << "kernel " << L.kernel << ", block (" << g_block_idx.x << "," << g_block_idx.y << "," << g_block_idx.z << ")";
  if (warp >= 0) os << ", warp " << warp;
  return os.str();
}

std::string state_name(const Fiber& f) {
  switch (f.state) {
    case kReady: return "running";
    case kAtWarp: return op_name(f.op);
    case kAtBarrier: return "__syncthreads";
    default: return "exited";
  }
}

extern "C" void apd_emu_fiber_entry() {
  Launch* L = g_launch;
  (*L->body)();
  Fiber* f = g_fiber;
  f->state = kDone;
  apd_emu_switch(&f->sp, L->sched_sp);
  std::abort();  // never resumed
}

void init_fiber(Fiber& f, unsigned char* stack) {
  f.stack = stack;
  uintptr_t top = reinterpret_cast<uintptr_t>(stack + kStackBytes) & ~uintptr_t(15);
  uint64_t* a = reinterpret_cast<uint64_t*>(top - 16);  // return-address slot, 16-byte aligned
  a[1] = 0;                                              // fake caller frame
  a[0] = reinterpret_cast<uint64_t>(&apd_emu_fiber_entry);
  for (int i = 1; i <= 6; ++i) a[-i] = 0;  // rbp rbx r12 r13 r14 r15
  uint32_t csr[2] = {0x1f80u, 0x037fu};    // default MXCSR, x87 control word
  std::memcpy(&a[-7], csr, 8);
  f.sp = &a[-7];
  f.state = kReady;
  f.op = Op::kNone;
  f.cp_open.clear();
  f.cp_groups.clear();
}

void block_here(int state) {
  Fiber* f = g_fiber;
  f->state = state;
  apd_emu_switch(&f->sp, g_launch->sched_sp);
}

// Resolves the collectives of one warp whose lanes are all blocked. Returns
// true if some lanes were released.
bool resolve_warp(Launch& L, int w, int n_threads) {
  const int first = w * 32;
  const int lanes = std::min(32, n_threads - first);
  bool progress = false;
  unsigned handled = 0;
  std::string error;  // raised only if no group of the warp can complete
  for (int l = 0; l < lanes; ++l) {
    Fiber& f = L.fibers[first + l];
    if (f.state != kAtWarp || ((handled >> l) & 1u)) continue;
    unsigned group = 0;
    if (f.op == Op::kActiveMask) {
      for (int k = 0; k < lanes; ++k) {
        const Fiber& g = L.fibers[first + k];
        if (g.state == kAtWarp && g.op == Op::kActiveMask) group |= 1u << k;
      }
    } else {
      const unsigned m = f.mask;
      if (!((m >> l) & 1u))
        throw Error("apd_emu: " + where(L, w) + ": lane " + std::to_string(l) + " calls " + op_name(f.op) +
                    " with mask " + hex(m) + " that does not contain the lane itself");
      unsigned same = 0, other = 0, exited = 0, barrier = 0, absent = 0, released = 0;
      for (int k = 0; k < 32; ++k) {
        if (!((m >> k) & 1u)) continue;
        if (k >= lanes) { absent |= 1u << k; continue; }
        const Fiber& g = L.fibers[first + k];
        if (g.state == kAtWarp && g.op == f.op && g.mask == m && g.nwords == f.nwords) same |= 1u << k;
        else if (g.state == kDone) exited |= 1u << k;
        else if (g.state == kAtBarrier) barrier |= 1u << k;
        else if (g.state == kReady) released |= 1u << k;  // by another group of this pass: retry later
        else other |= 1u << k;
      }
      if (same != m && released != 0) continue;
      if (same != m) {
        std::ostringstream os;
        os << "apd_emu: " << where(L, w) << ": " << op_name(f.op) << " with mask " << hex(m)
           << " but only lanes " << hex(same) << " arrive with that mask";
        if (exited) os << "; lanes " << hex(exited) << " have exited";
        if (barrier) os << "; lanes " << hex(barrier) << " wait at __syncthreads";
        if (absent) os << "; lanes " << hex(absent) << " do not exist (blockDim " << n_threads << ")";
        for (int k = 0; k < 32; ++k)
          if ((other >> k) & 1u) {
            const Fiber& g = L.fibers[first + k];
            os << "; lane " << k << " is at " << op_name(g.op) << " with mask " << hex(g.mask);
          }
        if (error.empty()) error = os.str();
        continue;
      }
      group = m;
    }
    // Every lane of the group sees every lane's words through the warp's snapshot.
    auto* snap = reinterpret_cast<uint32_t(*)[kMaxWords]>(L.snapshots[size_t(first)].data());
    const size_t bytes = sizeof(uint32_t) * size_t(f.nwords);
    for (int k = 0; k < lanes; ++k) {
      if (!((group >> k) & 1u)) continue;
      Fiber& g = L.fibers[first + k];
      if (bytes != 0) std::memcpy(snap[k], g.words, bytes);
      g.arrived = group;
      g.got = snap;
      g.state = kReady;
    }
    handled |= group;
    progress = true;
    ++L.resolved;
  }
  if (!progress && !error.empty()) throw Error(error);
  return progress;
}

// Ready fibers run one at a time; the next one is the lowest ready thread id
// (forward), the highest (reverse) or a random one (shuffle). A warp's
// collectives resolve as soon as all its lanes are blocked, and its lanes
// become ready again at once: with forward order warp 0 runs ahead to the next
// __syncthreads before warp 1 starts, with reverse the last warp does, so a
// missing barrier between warps shows up as a schedule-dependent result.
struct ReadyQueue {
  int schedule;
  std::mt19937_64* rng;
  std::vector<int> v;
  void push(int t) {
    v.push_back(t);
    if (schedule == 0) std::push_heap(v.begin(), v.end(), std::greater<int>());
    if (schedule == 1) std::push_heap(v.begin(), v.end(), std::less<int>());
  }
  int pop() {
    if (schedule == 0) std::pop_heap(v.begin(), v.end(), std::greater<int>());
    if (schedule == 1) std::pop_heap(v.begin(), v.end(), std::less<int>());
    if (schedule == 2) std::swap(v[(*rng)() % v.size()], v.back());
    const int t = v.back();
    v.pop_back();
    return t;
  }
};

void run_cta(Launch& L, int n_threads, std::mt19937_64& rng, int schedule) {
  for (int t = 0; t < n_threads; ++t) init_fiber(L.fibers[t], g_arena.stack(t));
  const int n_warps = (n_threads + 31) / 32;
  std::vector<int> running(n_warps, 0);  // lanes of each warp not blocked
  ReadyQueue q{schedule, &rng, {}};
  q.v.reserve(n_threads);
  for (int t = 0; t < n_threads; ++t) {
    q.push(t);
    ++running[t / 32];
  }
  for (;;) {
    while (!q.v.empty()) {
      const int t = q.pop();
      g_fiber = &L.fibers[t];
      apd_emu_switch(&L.sched_sp, L.fibers[t].sp);
      g_fiber = nullptr;
      if (!L.error.empty()) throw Error(L.error);
      const int w = t / 32;
      if (--running[w] == 0 && resolve_warp(L, w, n_threads)) {
        for (int l = 0; l < 32 && w * 32 + l < n_threads; ++l)
          if (L.fibers[w * 32 + l].state == kReady) {
            q.push(w * 32 + l);
            ++running[w];
          }
      }
    }
    int at_barrier = 0, done = 0;
    for (int t = 0; t < n_threads; ++t) {
      at_barrier += L.fibers[t].state == kAtBarrier;
      done += L.fibers[t].state == kDone;
    }
    if (done == n_threads) return;
    if (at_barrier == n_threads) {
      for (int t = 0; t < n_threads; ++t) {
        L.fibers[t].state = kReady;
        q.push(t);
        ++running[t / 32];
      }
      ++L.resolved;
      continue;
    }
    // Some threads wait at __syncthreads that others never reach.
    std::ostringstream os;
    os << "apd_emu: " << where(L, -1) << ": __syncthreads not reached by every thread (" << at_barrier << " of "
       << n_threads << " wait there";
    int shown = 0;
    for (int t = 0; t < n_threads && shown < 4; ++t)
      if (L.fibers[t].state != kAtBarrier) {
        os << "; thread " << t << " (warp " << t / 32 << ") " << state_name(L.fibers[t]);
        ++shown;
      }
    os << ")";
    throw Error(os.str());
  }
}

}  // namespace

const char* op_name(Op op) {
  switch (op) {
    case Op::kShfl: return "__shfl_sync";
    case Op::kShflUp: return "__shfl_up_sync";
    case Op::kShflDown: return "__shfl_down_sync";
    case Op::kShflXor: return "__shfl_xor_sync";
    case Op::kBallot: return "__ballot_sync";
    case Op::kAny: return "__any_sync";
    case Op::kAll: return "__all_sync";
    case Op::kMatchAny: return "__match_any_sync";
    case Op::kActiveMask: return "__activemask";
    case Op::kSyncWarp: return "__syncwarp";
    case Op::kLdmatrix: return "ldmatrix";
    case Op::kMma: return "mma.sync";
    default: return "?";
  }
}

void collective(Op op, unsigned mask, const uint32_t* words, int nwords) {
  Fiber* f = g_fiber;
  if (f == nullptr) throw Error("apd_emu: a warp collective outside a kernel");
  f->op = op;
  f->mask = mask;
  f->nwords = nwords;
  for (int i = 0; i < nwords; ++i) f->words[i] = words[i];
  block_here(kAtWarp);
  f->op = Op::kNone;
}

void syncthreads() {
  if (g_fiber == nullptr) throw Error("apd_emu: __syncthreads outside a kernel");
  block_here(kAtBarrier);
}

void fail(const std::string& what) {
  Fiber* f = g_fiber;
  if (f == nullptr) throw Error("apd_emu: " + what);
  Launch& L = *g_launch;
  L.error = "apd_emu: " + where(L, f->warp) + ", thread " + std::to_string(f->linear) + ": " + what;
  f->state = kDone;
  apd_emu_switch(&f->sp, L.sched_sp);
  std::abort();
}

void set_schedule(int kind, uint64_t seed) {
  if (kind < 0 || kind > 2) throw Error("apd_emu: schedule must be 0 (forward), 1 (reverse) or 2 (shuffle)");
  g_schedule = kind;
  g_seed = seed;
}
int schedule_kind() { return g_schedule; }
uint64_t collectives_resolved() { return g_last_resolved; }

cudaError_t take_last_error() {
  const cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}
void set_last_error(cudaError_t e) { g_last_error = e; }

namespace {
// Index = device id; 0 is the default (an H100: the planners' historical 132 SMs).
const DeviceProfile kProfiles[] = {
    {"H100", 9, 0, 232448, 233472, 132, 65536},
    {"A100", 8, 0, 166912, 167936, 108, 65536},
    {"A5000", 8, 6, 101376, 102400, 64, 65536},
    {"RTX4090", 8, 9, 101376, 102400, 128, 65536},
};
constexpr int kNumProfiles = int(sizeof(kProfiles) / sizeof(kProfiles[0]));
std::atomic<int> g_device{0};
}  // namespace

int device_count() { return kNumProfiles; }
const DeviceProfile& device_profile(int device) {
  if (device < 0 || device >= kNumProfiles) throw Error("apd_emu: no device profile " + std::to_string(device));
  return kProfiles[device];
}
int active_device() { return g_device.load(); }
int set_active_device(int device) {
  if (device < 0 || device >= kNumProfiles) return cudaErrorInvalidValue;
  g_device.store(device);
  return cudaSuccess;
}

int set_max_dynamic_smem(const void* kernel, int bytes) {
  // Above the opt-in limit the driver answers cudaErrorInvalidValue; the
  // harness makes it a hard error naming the kernel and the profile, as for a
  // launch over the limit (a planner bug, not a condition a launcher handles).
  const DeviceProfile& dev = device_profile(active_device());
  if (bytes > dev.smem_optin)
    throw Error("apd_emu: " + kernel_name(kernel) + ": MaxDynamicSharedMemorySize " + std::to_string(bytes) +
                " bytes, over the " + std::to_string(dev.smem_optin) + " byte opt-in limit of the " + dev.name +
                " profile (sm_" + std::to_string(dev.cc_major) + std::to_string(dev.cc_minor) +
                "): the planner chose a tile that does not fit this device");
  if (bytes < 0 || size_t(bytes) > kMaxSmemBytes) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(g_mutex);
  g_max_dyn_smem[kernel] = bytes;
  return cudaSuccess;
}

void register_dynamic_smem(void* (*get)(), const char* name) { dyn_smem().push_back(DynSmem{get, name}); }

// Shared addresses: region r (a registered dynamic array) at offset o -> (r << 20) | o.
uint32_t shared_address(const void* p) {
  const auto* c = static_cast<const unsigned char*>(p);
  const auto& regs = dyn_smem();
  for (size_t r = 0; r < regs.size(); ++r) {
    const auto* base = static_cast<const unsigned char*>(regs[r].get());
    if (c >= base && c < base + kMaxSmemBytes) return uint32_t(r << 20) | uint32_t(c - base);
  }
  fail("__cvta_generic_to_shared of a pointer outside the dynamic shared memory");
}

unsigned char* shared_pointer(uint32_t a, size_t bytes) {
  const size_t r = a >> 20, o = a & 0xfffffu;
  const auto& regs = dyn_smem();
  if (r >= regs.size() || o + bytes > g_dyn_bytes)
    fail("shared address " + hex(a) + " (+" + std::to_string(bytes) + " bytes) outside the " +
         std::to_string(g_dyn_bytes) + " bytes of dynamic shared memory of this launch");
  return static_cast<unsigned char*>(regs[r].get()) + o;
}

int launch(const void* kernel, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  const bool bad_grid = grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 ||
                        grid.z > 65535;
  const bool bad_block = threads == 0 || threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64;
  if (bad_grid || bad_block) {
    g_last_error = cudaErrorInvalidConfiguration;
    return cudaErrorInvalidConfiguration;
  }
  const DeviceProfile& dev = device_profile(active_device());
  if (smem > size_t(dev.smem_optin))
    throw Error("apd_emu: launch of " + kernel_name(kernel) + " asks for " + std::to_string(smem) +
                " bytes of dynamic shared memory, over the " + std::to_string(dev.smem_optin) +
                " byte opt-in limit of the " + dev.name + " profile (sm_" + std::to_string(dev.cc_major) +
                std::to_string(dev.cc_minor) + "): the planner chose a tile that does not fit this device");
  const auto it = g_max_dyn_smem.find(kernel);
  const size_t limit = it == g_max_dyn_smem.end() ? 48 * 1024 : size_t(it->second);
  if (smem > limit) {
    g_last_error = cudaErrorInvalidValue;
    return cudaErrorInvalidValue;
  }
  Launch L;
  L.kernel = kernel_name(kernel);
  L.body = &body;
  L.fibers.resize(threads);
  L.snapshots.resize(threads);
  for (uint64_t t = 0; t < threads; ++t) {
    Fiber& f = L.fibers[t];
    f.linear = int(t);
    f.warp = int(t / 32);
    f.lane = int(t % 32);
    f.tid = uint3{unsigned(t % block.x), unsigned((t / block.x) % block.y), unsigned(t / (uint64_t(block.x) * block.y))};
  }
  g_arena.ensure(threads);
  g_block_dim = block;
  g_grid_dim = grid;
  g_dyn_bytes = smem;
  std::vector<uint3> ctas;
  ctas.reserve(size_t(grid.x) * grid.y * grid.z);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) ctas.push_back(uint3{x, y, z});
  std::mt19937_64 rng(g_seed * 0x9e3779b97f4a7c15ull + 1);
  if (g_schedule == 1) std::reverse(ctas.begin(), ctas.end());
  if (g_schedule == 2) std::shuffle(ctas.begin(), ctas.end(), rng);
  g_launch = &L;
  try {
    for (const uint3& c : ctas) {
      g_block_idx = c;
      // Fresh dynamic shared memory holds garbage: a pattern that differs between schedules.
      for (const auto& r : dyn_smem()) {
        auto* p = static_cast<unsigned char*>(r.get());
        const size_t n = (smem + 7) & ~size_t(7);  // only what the launch asked for
        if (g_schedule == 2) {
          for (size_t i = 0; i < n; i += 8) {
            const uint64_t v = rng();
            std::memcpy(p + i, &v, 8);
          }
        } else {
          std::memset(p, g_schedule == 0 ? 0xff : 0x7f, n);
        }
      }
      run_cta(L, int(threads), rng, g_schedule);
    }
  } catch (...) {
    g_launch = nullptr;
    g_fiber = nullptr;
    g_last_resolved = L.resolved;
    throw;
  }
  g_launch = nullptr;
  g_last_resolved = L.resolved;
  return cudaSuccess;
}

}  // namespace apd_emu

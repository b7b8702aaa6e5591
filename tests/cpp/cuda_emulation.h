// Just enough of CUDA's execution model, on the CPU, to run this project's kernel headers in a C++
// test without a GPU (CI has none): the blocks of a launch run one after another, the threads of a
// block as std::threads; __syncthreads is a barrier of the block, a warp shuffle goes through an
// exchange buffer between two barriers of the warp, __shared__ variables are function statics (one
// block runs at a time, so only its threads share them), and atomicAdd takes one global lock. Not
// emulated: memory ordering beyond the barriers and atomics, vector atomics, warp divergence costs,
// anything about speed. Include before the kernel header.
#pragma once

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

using std::max;
using std::min;
using std::sqrt;

namespace cuda_emu {

class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(m_);
    const long gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return gen != gen_; });
    }
  }

 private:
  int n_, count_ = 0;
  long gen_ = 0;
  std::mutex m_;
  std::condition_variable cv_;
};

struct Block {
  std::unique_ptr<Barrier> all;
  std::vector<std::unique_ptr<Barrier>> warps;
  std::vector<double> exchange;  // one slot per thread, for shuffles
};

inline Block*& current() {
  static Block* block = nullptr;
  return block;
}

inline int linear_tid() { return static_cast<int>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)); }

// Runs kernel() once per thread of every block of `grid`, blocks in order.
template <typename Kernel>
void launch(dim3 grid, dim3 block, Kernel kernel) {
  gridDim = grid;
  blockDim = block;
  const int n = static_cast<int>(block.x * block.y * block.z);
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block b;
        b.all = std::make_unique<Barrier>(n);
        for (int w = 0; w * 32 < n; ++w) b.warps.push_back(std::make_unique<Barrier>(std::min(32, n - w * 32)));
        b.exchange.assign(n, 0.0);
        current() = &b;
        std::vector<std::thread> threads;
        threads.reserve(n);
        for (int t = 0; t < n; ++t) {
          threads.emplace_back([&, t] {
            threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            blockIdx = dim3(bx, by, bz);
            kernel();
          });
        }
        for (auto& th : threads) th.join();
        current() = nullptr;
      }
    }
  }
}

}  // namespace cuda_emu

inline void __syncthreads() { cuda_emu::current()->all->wait(); }

// Global-memory atomics: one lock for all of them (correct, and slow, which does not matter here).
namespace cuda_emu {
inline std::mutex& atomic_lock() {
  static std::mutex m;
  return m;
}
}  // namespace cuda_emu

template <typename T>
T atomicAdd(T* address, T v) {
  std::lock_guard<std::mutex> lock(cuda_emu::atomic_lock());
  const T old = *address;
  *address = old + v;
  return old;
}

// Lane srcLane of this lane's width-wide segment of the warp (width a power of two <= 32).
template <typename T>
T __shfl_sync(unsigned /*mask*/, T v, int src_lane, int width = 32) {
  cuda_emu::Block* b = cuda_emu::current();
  const int tid = cuda_emu::linear_tid();
  const int lane = tid & 31;
  const int src = (tid - lane) + (lane & ~(width - 1)) + (src_lane & (width - 1));
  b->exchange[tid] = static_cast<double>(v);  // float, double and 32-bit ints round-trip exactly
  b->warps[tid / 32]->wait();
  const T r = static_cast<T>(b->exchange[src]);
  b->warps[tid / 32]->wait();
  return r;
}

template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask) {
  cuda_emu::Block* b = cuda_emu::current();
  const int tid = cuda_emu::linear_tid();
  b->exchange[tid] = static_cast<double>(v);  // float and double round-trip exactly
  b->warps[tid / 32]->wait();
  const T r = static_cast<T>(b->exchange[tid ^ lane_mask]);
  b->warps[tid / 32]->wait();
  return r;
}

// VEC contiguous elements moved as one aligned access (16 bytes: 8 fp16/bf16 or 4 fp32; 4 and 8
// bytes for smaller VEC) and widened to / narrowed from the accumulation type. Both ops' kernels use
// it; the caller guarantees the alignment (the hosts check the pointers before picking VEC > 1).
#pragma once

namespace dbsam {

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <int V, typename T, typename acc_t>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, acc_t (&out)[V]) {
  const Vec<T, V> x = *reinterpret_cast<const Vec<T, V>*>(p);
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = static_cast<acc_t>(x.v[j]);
}

template <int V, typename T, typename acc_t>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const acc_t (&in)[V]) {
  Vec<T, V> x;
#pragma unroll
  for (int j = 0; j < V; ++j) x.v[j] = static_cast<T>(in[j]);
  *reinterpret_cast<Vec<T, V>*>(p) = x;
}

}  // namespace dbsam

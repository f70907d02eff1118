// The elementwise glue of a decoder layer on CPU, one call each instead of a chain of ATen ops.
//
// Measured on the 2-core build machine (torch 2.15, 2 threads): F.rms_norm of a 2048-token
// prefill chunk [2048, 576] took ~14 ms (its CPU kernel is not vectorized for this shape) where
// one pass over the rows takes a fraction of a millisecond, and the rotary embedding plus the
// KV-cache write of the same chunk ran as ~15 separate ATen ops (slices, four multiplies, cat,
// stack, index_copy_), each allocating its output. At decode's small batches the same chains
// cost a few microseconds of dispatch per op, 30 layers a step.
//
//   rms_norm(out, x, w, eps)      out[r] = (x[r] * 1/sqrt(mean(x[r]^2) + eps)) * w
//   silu_mul(out, gate_up)        out[t] = silu(gate_up[t, :I]) * gate_up[t, I:]   (SwiGLU's product)
//   rope_write_kv(q_out, cache_rows, qkv, cos, sin, positions, slots, nh, nkv, num_slots)
//       q_out[t, h]  = rope(qkv[t, q head h], positions[t])              (HF's rotate_half form)
//       cache_rows[(0 * nkv + g) * num_slots + slots[t]] = rope(qkv[t, k head g], positions[t])
//       cache_rows[(1 * nkv + g) * num_slots + slots[t]] = qkv[t, v head g]
//
// The arithmetic is the torch path's, in the same order: the rotation is x1*cos - x2*sin and
// x2*cos + x1*sin with each product rounded (fp-contract off: no fused multiply-add), and the
// norm multiplies by the reciprocal square root, then by the weight. Only the sum of squares is
// reduced in a different order (16 lanes, then a tree), as any vectorized reduction is, and
// silu's exp is a Cephes-style polynomial (max relative error ~2e-7, 1-2 ulp; ATen uses SLEEF's):
// SwiGLU's gate and up in one pass and one output instead of silu's and the product's two.
// float32 only; the Python side keeps the ATen path for every other dtype.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

#include "vec.h"

#pragma GCC optimize("fp-contract=off")

namespace {

using namespace fleetserve_vec;

// Rows per parallel chunk: enough values that a thread's share outweighs waking it.
inline int64_t grain_rows(int64_t values_per_row) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, values_per_row));
}

void check_float_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
}

}  // namespace

void rms_norm(at::Tensor out, const at::Tensor& x, const at::Tensor& w, double eps) {
  check_float_cpu(x, "x");
  check_float_cpu(w, "w");
  check_float_cpu(out, "out");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [rows, hidden] with contiguous rows");
  const int64_t rows = x.size(0), hidden = x.size(1), stride = x.stride(0);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == hidden && w.is_contiguous(), "w must be [hidden], contiguous");
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == rows && out.size(1) == hidden,
              "out must be a contiguous [rows, hidden]");
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float epsf = static_cast<float>(eps);
  const float n = static_cast<float>(hidden);
  at::parallel_for(0, rows, grain_rows(hidden), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * stride;
      float* orow = op + r * hidden;
      vfloat acc = {};
      int64_t j = 0;
      for (; j + kLanes <= hidden; j += kLanes) {
        const vfloat v = vload(xr + j);
        acc += v * v;
      }
      float ss = hsum(acc);
      for (; j < hidden; ++j) ss += xr[j] * xr[j];
      const float inv = 1.0f / std::sqrt(ss / n + epsf);
      j = 0;
      for (; j + kLanes <= hidden; j += kLanes) vstore(orow + j, (vload(xr + j) * inv) * vload(wp + j));
      for (; j < hidden; ++j) orow[j] = (xr[j] * inv) * wp[j];
    }
  });
}

namespace {

typedef int32_t vint __attribute__((vector_size(64), aligned(4)));

// exp(x) lane by lane: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by Cephes' degree-6 polynomial, 2^n
// from the exponent bits. Inputs are clamped to [-87.3, 88.7] (exp stays finite and normal).
inline vfloat vexp(vfloat x) {
  const vfloat hi = x > 88.72283f ? vfloat{} + 88.72283f : x;
  x = hi < -87.33654f ? vfloat{} - 87.33654f : hi;
  const vfloat t = x * 1.44269504088896341f;
  const vint n = __builtin_convertvector(t + (t >= 0.0f ? vfloat{} + 0.5f : vfloat{} - 0.5f), vint);
  const vfloat nf = __builtin_convertvector(n, vfloat);
  const vfloat r = (x - nf * 0.693359375f) - nf * -2.12194440e-4f;
  vfloat p = vfloat{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const vfloat y = p * (r * r) + r + 1.0f;
  const vint bits = (n + 127) << 23;
  vfloat scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

// dst[0:half] = x1*c - x2*s, dst[half:] = x2*c + x1*s (x1 = src[0:half], x2 = src[half:]).
inline void rotate(float* dst, const float* src, const float* c, const float* s, int64_t half) {
  int64_t j = 0;
  for (; j + kLanes <= half; j += kLanes) {
    const vfloat x1 = vload(src + j), x2 = vload(src + half + j), cv = vload(c + j), sv = vload(s + j);
    vstore(dst + j, x1 * cv - x2 * sv);
    vstore(dst + half + j, x2 * cv + x1 * sv);
  }
  for (; j < half; ++j) {
    const float x1 = src[j], x2 = src[half + j];
    dst[j] = x1 * c[j] - x2 * s[j];
    dst[half + j] = x2 * c[j] + x1 * s[j];
  }
}

}  // namespace

void rope_write_kv(at::Tensor q_out, at::Tensor cache_rows, const at::Tensor& qkv, const at::Tensor& cos,
                   const at::Tensor& sin, const at::Tensor& positions, const at::Tensor& slots, int64_t nh,
                   int64_t nkv, int64_t num_slots) {
  check_float_cpu(q_out, "q_out");
  check_float_cpu(cache_rows, "cache_rows");
  check_float_cpu(qkv, "qkv");
  check_float_cpu(cos, "cos");
  check_float_cpu(sin, "sin");
  TORCH_CHECK(positions.scalar_type() == at::kLong && slots.scalar_type() == at::kLong,
              "positions and slots must be int64");
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "qkv must be [tokens, (nh + 2 nkv) * hd] with contiguous rows");
  const int64_t tokens = qkv.size(0);
  const int64_t hd = cache_rows.size(1);
  const int64_t half = hd / 2;
  TORCH_CHECK(hd % 2 == 0 && qkv.size(1) == (nh + 2 * nkv) * hd, "qkv width must be (nh + 2 nkv) * head_dim");
  TORCH_CHECK(cache_rows.is_contiguous() && cache_rows.size(0) == 2 * nkv * num_slots,
              "cache_rows must be a contiguous [2 * nkv * num_slots, head_dim]");
  TORCH_CHECK(q_out.is_contiguous() && q_out.numel() == tokens * nh * hd, "q_out must be a contiguous [tokens, nh, hd]");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.size(1) == half && sin.sizes() == cos.sizes(),
              "cos and sin must be contiguous [positions, head_dim / 2]");
  TORCH_CHECK(positions.is_contiguous() && slots.is_contiguous() && positions.numel() == tokens &&
                  slots.numel() == tokens, "positions and slots need one entry per token");
  const float* src = qkv.data_ptr<float>();
  const int64_t stride = qkv.stride(0);
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t max_pos = cos.size(0);
  float* qo = q_out.data_ptr<float>();
  float* rows = cache_rows.data_ptr<float>();
  // validate indices before any thread writes (an out-of-range slot would corrupt memory)
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < max_pos, "position ", pos[t], " outside the rope table (", max_pos, ")");
    TORCH_CHECK(slot[t] >= 0 && slot[t] < num_slots, "slot ", slot[t], " outside the cache (", num_slots, ")");
  }
  at::parallel_for(0, tokens, grain_rows((nh + 2 * nkv) * hd), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* row = src + t * stride;
      const float* c = cp + pos[t] * half;
      const float* s = sp + pos[t] * half;
      for (int64_t h = 0; h < nh; ++h) rotate(qo + (t * nh + h) * hd, row + h * hd, c, s, half);
      for (int64_t g = 0; g < nkv; ++g) {
        rotate(rows + (g * num_slots + slot[t]) * hd, row + (nh + g) * hd, c, s, half);
        const float* v = row + (nh + nkv + g) * hd;
        float* dst = rows + ((nkv + g) * num_slots + slot[t]) * hd;
        for (int64_t j = 0; j < hd; ++j) dst[j] = v[j];
      }
    }
  });
}

void silu_mul(at::Tensor out, const at::Tensor& gate_up) {
  check_float_cpu(out, "out");
  check_float_cpu(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0,
              "gate_up must be [tokens, 2 * intermediate] with contiguous rows");
  const int64_t tokens = gate_up.size(0), inter = gate_up.size(1) / 2, stride = gate_up.stride(0);
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == tokens && out.size(1) == inter,
              "out must be a contiguous [tokens, intermediate]");
  const float* src = gate_up.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, tokens, grain_rows(2 * inter), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* g = src + t * stride;
      const float* u = g + inter;
      float* o = dst + t * inter;
      int64_t j = 0;
      for (; j + kLanes <= inter; j += kLanes) {
        const vfloat gv = vload(g + j);
        vstore(o + j, gv / (1.0f + vexp(-gv)) * vload(u + j));
      }
      for (; j < inter; ++j) o[j] = g[j] / (1.0f + std::exp(-g[j])) * u[j];
    }
  });
}

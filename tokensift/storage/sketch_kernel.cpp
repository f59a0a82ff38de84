// Scores of query rows against a packed low-bit key sketch, unpacked on the fly.
//
// codes   uint8 [batch, heads, groups, width, group]: byte j of each of `group` tokens (see sketch.py:
//         group-major layout, `8 / bits` codes per byte, low bits first, channel = j * (8 / bits) + slot);
//         any strides outside each group's [width, group] block (a view of a buffer with spare room)
// weights fp32  [batch, heads, groups, rows, dim]: each query row times the group's per-channel scales
// offset  fp32  [batch, heads, groups, rows]: each query row's dot product with the group's zero-points
// returns fp32  [batch, heads * rows, groups * group]: offset + sum over channels of weight * code
//
// The same numbers as unpacking the codes to floats and multiplying (sketch.py's eager path),
// summed channel by channel; one item (a group of one KV head) at a time per thread, its
// accumulators kept in cache, so the codes are read once and never expanded in memory.
//
// sketch_choose does a whole decode step's choice for one sequence in one call (tiered.py's
// choose_unpadded and the tail's group sums): scores, softmax weights, top k, read rows forgotten.
// dequantize_ring and quantize_into_ring serve the low-bit sliding windows (window.py) the tiered
// policy holds on Gemma 3: the same numbers as their eager paths, bit for bit.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

// One item: `rows` score rows of `group` tokens, accumulated channel by channel (the codes of
// one channel are unpacked once into `level`, then added to every row).
// Row `row` goes to out[row * stride .. + group].
static void score_item(const uint8_t* __restrict__ codes, const float* __restrict__ weights, const float* __restrict__ offsets,
                       float* __restrict__ out, int64_t stride, float* __restrict__ level, int64_t rows, int64_t dim,
                       int64_t width, int64_t group, int bits) {
  const int per_byte = 8 / bits, mask = (1 << bits) - 1;
  for (int64_t row = 0; row < rows; ++row)
    for (int64_t t = 0; t < group; ++t) out[row * stride + t] = offsets[row];
  for (int64_t byte = 0; byte < width; ++byte) {
    const uint8_t* __restrict__ column = codes + byte * group;
    for (int slot = 0; slot < per_byte; ++slot) {
      const int shift = slot * bits;
      for (int64_t t = 0; t < group; ++t) level[t] = static_cast<float>((column[t] >> shift) & mask);
      for (int64_t row = 0; row < rows; ++row) {
        const float weight = weights[row * dim + byte * per_byte + slot];
        float* __restrict__ acc = out + row * stride;
        for (int64_t t = 0; t < group; ++t) acc[t] += weight * level[t];
      }
    }
  }
}

torch::Tensor sketch_scores(torch::Tensor codes, torch::Tensor weights, torch::Tensor offset, int64_t bits) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "bits must be 2, 4 or 8");
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.dim() == 5 && codes.stride(4) == 1 && codes.stride(3) == codes.size(4),
              "codes: uint8 [batch, heads, groups, width, group], each group's [width, group] contiguous");
  TORCH_CHECK(weights.scalar_type() == torch::kFloat32 && weights.dim() == 5 && weights.is_contiguous(),
              "weights: contiguous fp32 [batch, heads, groups, rows, dim]");
  TORCH_CHECK(offset.scalar_type() == torch::kFloat32 && offset.dim() == 4 && offset.is_contiguous(),
              "offset: contiguous fp32 [batch, heads, groups, rows]");
  const int64_t batch = codes.size(0), heads = codes.size(1), groups = codes.size(2), width = codes.size(3), group = codes.size(4);
  const int64_t rows = weights.size(3), dim = weights.size(4), per_byte = 8 / bits;
  TORCH_CHECK(weights.size(0) == batch && weights.size(1) == heads && weights.size(2) == groups, "weights: shape disagrees with codes");
  TORCH_CHECK(offset.size(0) == batch && offset.size(1) == heads && offset.size(2) == groups && offset.size(3) == rows,
              "offset: shape disagrees with weights");
  TORCH_CHECK(width * per_byte == dim, "codes hold ", width * per_byte, " channels, weights ", dim);
  // [batch, heads * rows, groups * group]: query head (head, row) scores token (g, t) at column g * group + t
  auto out = torch::empty({batch, heads * rows, groups * group}, weights.options());
  const uint8_t* all_codes = codes.data_ptr<uint8_t>();
  const float* all_weights = weights.data_ptr<float>();
  const float* all_offsets = offset.data_ptr<float>();
  float* all_out = out.data_ptr<float>();
  const int64_t items = batch * heads * groups;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> level(group);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item % groups, h = (item / groups) % heads, b = item / (groups * heads);
      const uint8_t* item_codes = all_codes + b * codes.stride(0) + h * codes.stride(1) + g * codes.stride(2);
      float* target = all_out + (b * heads + h) * rows * groups * group + g * group;
      score_item(item_codes, all_weights + item * rows * dim, all_offsets + item * rows, target, groups * group,
                 level.data(), rows, dim, width, group, static_cast<int>(bits));
    }
  });
  return out;
}

// A key that orders floats as unsigned integers do (negative ones reversed below the positive ones).
static inline uint32_t order_key(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// The k-th largest of x[0..n) (1 <= k <= n): a histogram of the top 12 key bits finds the bucket that
// holds it, then nth_element over that bucket's values only (radix select). `values` is scratch room.
static float kth_largest(const float* x, int64_t n, int64_t k, std::vector<float>& values) {
  constexpr int SHIFT = 20, BUCKETS = 1 << 12;
  int64_t counts[BUCKETS] = {};
  for (int64_t t = 0; t < n; ++t) ++counts[order_key(x[t]) >> SHIFT];
  int64_t bucket = BUCKETS - 1, above = 0;
  while (above + counts[bucket] < k) above += counts[bucket--];
  values.clear();
  for (int64_t t = 0; t < n; ++t)
    if (static_cast<int64_t>(order_key(x[t]) >> SHIFT) == bucket) values.push_back(x[t]);
  const int64_t within = k - above;  // 1-based rank inside the bucket
  std::nth_element(values.begin(), values.begin() + within - 1, values.end(), std::greater<float>());
  return values[within - 1];
}

// The `k` slots of `score` (length n) with the largest scores, every forced slot among them
// (slots < sinks or >= forced_from), ascending. Ties at the k-th score are broken by slot, the lower
// first. `values` is scratch room.
static void top_k_slots(const float* score, int64_t n, int64_t k, int64_t sinks, int64_t forced_from, int64_t* chosen,
                        std::vector<float>& values) {
  const int64_t forced_until = std::min(sinks, forced_from);
  const int64_t rest = k - forced_until - (n - forced_from);
  float threshold = std::numeric_limits<float>::infinity();
  int64_t ties = 0;
  if (rest > 0) {
    threshold = kth_largest(score + forced_until, forced_from - forced_until, rest, values);
    int64_t above = 0;
    for (int64_t t = forced_until; t < forced_from; ++t) above += score[t] > threshold;
    ties = rest - above;
  }
  int64_t taken = 0;
  for (int64_t t = 0; t < n && taken < k; ++t) {
    if (t < forced_until || t >= forced_from || score[t] > threshold) {
      chosen[taken++] = t;
    } else if (score[t] == threshold && ties > 0) {
      chosen[taken++] = t;
      --ties;
    }
  }
  // only NaN scores (no strict order) leave slots unfilled: repeat the last one rather than read garbage
  for (; taken < k; ++taken) chosen[taken] = taken ? chosen[taken - 1] : 0;
}

// Sum and maximum of x[0..n) in 16 independent lanes, so the compiler vectorizes them (a float sum
// in one accumulator cannot be reordered); the sum's rounding differs from a sequential one.
static constexpr int64_t LANES = 16;

static float lane_sum(const float* __restrict__ x, int64_t n) {
  float acc[LANES] = {};
  int64_t t = 0;
  for (; t + LANES <= n; t += LANES)
    for (int64_t j = 0; j < LANES; ++j) acc[j] += x[t + j];
  float total = 0.0f;
  for (; t < n; ++t) total += x[t];
  for (int64_t j = 0; j < LANES; ++j) total += acc[j];
  return total;
}

static float lane_max(const float* __restrict__ x, int64_t n) {
  float acc[LANES];
  std::fill(acc, acc + LANES, -std::numeric_limits<float>::infinity());
  int64_t t = 0;
  for (; t + LANES <= n; t += LANES)
    for (int64_t j = 0; j < LANES; ++j) acc[j] = std::max(acc[j], x[t + j]);
  float top = -std::numeric_limits<float>::infinity();
  for (; t < n; ++t) top = std::max(top, x[t]);
  for (int64_t j = 0; j < LANES; ++j) top = std::max(top, acc[j]);
  return top;
}

// exp(x) for x <= 0 in plain arithmetic the compiler vectorizes (Cephes' expf: x = n ln2 + r,
// a degree-6 polynomial in r, 2^n from the exponent bits); 0 below -87. About 1 ulp from std::exp.
static void exp_nonpositive(const float* __restrict__ x, float* __restrict__ out, int64_t n) {
  for (int64_t t = 0; t < n; ++t) {
    const float clamped = std::max(x[t], -87.0f);
    const float whole = std::floor(clamped * 1.44269504088896341f + 0.5f);
    const float r = clamped - whole * 0.693359375f + whole * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float y = p * r * r + r + 1.0f;
    const int32_t exponent = (static_cast<int32_t>(whole) + 127) << 23;
    float two_to_whole;
    std::memcpy(&two_to_whole, &exponent, sizeof(float));
    out[t] = x[t] < -87.0f ? 0.0f : y * two_to_whole;
  }
}

// One KV head of one sequence: `rows` query heads' logits over n = groups * group slots (scored
// group by group), their weights exp(logit - peak), the chosen slots (one choice for the KV head
// ranked by the largest probability any of its query heads gives a slot, or one per query head),
// the weights of the chosen slots set to 0 and summed per group (what the tail reads).
struct HeadChoice {
  const float* logits;  // [rows, n]
  float* weights;       // [rows, n], in place
  int64_t rows, n, k, sinks, forced_from, group;
  bool share;
};

static void choose_head(const HeadChoice& c, int64_t* chosen, float* peak, float* mass, std::vector<float>& score,
                        std::vector<float>& values) {
  for (int64_t row = 0; row < c.rows; ++row) {
    const float* logit = c.logits + row * c.n;
    float* weight = c.weights + row * c.n;
    const float top = lane_max(logit, c.n);
    peak[row] = top;
    for (int64_t t = 0; t < c.n; ++t) weight[t] = logit[t] - top;
    exp_nonpositive(weight, weight, c.n);
  }
  if (c.share) {
    std::fill(score.begin(), score.end(), 0.0f);
    for (int64_t row = 0; row < c.rows; ++row) {
      const float* weight = c.weights + row * c.n;
      const float total = std::max(lane_sum(weight, c.n), std::numeric_limits<float>::min());
      for (int64_t t = 0; t < c.n; ++t) score[t] = std::max(score[t], weight[t] / total);
    }
    top_k_slots(score.data(), c.n, c.k, c.sinks, c.forced_from, chosen, values);
  } else {
    for (int64_t row = 0; row < c.rows; ++row)
      top_k_slots(c.logits + row * c.n, c.n, c.k, c.sinks, c.forced_from, chosen + row * c.k, values);
  }
  for (int64_t row = 0; row < c.rows; ++row) {
    float* weight = c.weights + row * c.n;
    const int64_t* read = chosen + (c.share ? 0 : row * c.k);
    for (int64_t i = 0; i < c.k; ++i) weight[read[i]] = 0.0f;
    for (int64_t g = 0; g < c.n / c.group; ++g)
      mass[row * (c.n / c.group) + g] = lane_sum(weight + g * c.group, c.group);
  }
}

// codes/weights/offset as for sketch_scores, one sequence (batch 1). Returns
// (index int64 [1, heads or heads * rows, k], mass fp32 [1, heads * rows, groups], peak fp32 [1, heads * rows, 1]).
std::vector<torch::Tensor> sketch_choose(torch::Tensor codes, torch::Tensor weights, torch::Tensor offset, int64_t bits,
                                         int64_t k, int64_t sinks, int64_t forced_from, bool share) {
  TORCH_CHECK(codes.size(0) == 1, "sketch_choose: one sequence");
  const int64_t heads = codes.size(1), groups = codes.size(2), group = codes.size(4), rows = weights.size(3);
  const int64_t n = groups * group, forced = std::min(sinks, n) + std::max<int64_t>(0, n - std::max(forced_from, sinks));
  TORCH_CHECK(k <= n && forced <= k, "sketch_choose: k must cover the forced slots and fit the sketch");
  auto logits = sketch_scores(codes, weights, offset, bits);  // [1, heads * rows, n]
  auto softmax_weights = torch::empty_like(logits);
  const int64_t choices = share ? heads : heads * rows;
  auto index = torch::empty({1, choices, k}, logits.options().dtype(torch::kInt64));
  auto mass = torch::empty({1, heads * rows, groups}, logits.options());
  auto peak = torch::empty({1, heads * rows, 1}, logits.options());
  const float* all_logits = logits.data_ptr<float>();
  float* all_weights = softmax_weights.data_ptr<float>();
  int64_t* all_index = index.data_ptr<int64_t>();
  float* all_mass = mass.data_ptr<float>();
  float* all_peak = peak.data_ptr<float>();
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> score(n), values;
    values.reserve(n);
    for (int64_t h = begin; h < end; ++h) {
      const HeadChoice c{all_logits + h * rows * n, all_weights + h * rows * n, rows, n, k, sinks, forced_from, group, share};
      choose_head(c, all_index + h * (share ? 1 : rows) * k, all_peak + h * rows, all_mass + h * rows * groups, score,
                  values);
    }
  });
  return {index, mass, peak};
}

// A sliding window held as grouped low-bit codes in a ring (window.py): fp32 [batch, heads, n, groups * group]
// with token i = ring slot (start + i) % n, each value code * scale + zero exactly as the eager
// dequantize computes it (a product, then a sum: no fused multiply-add).
// packed uint8 [batch, heads, n, groups, group * bits / 8]; scale, zero fp16 [batch, heads, n, groups, 1]
template <int BITS>
__attribute__((optimize("fp-contract=off")))
static void dequantize_token(const uint8_t* __restrict__ packed, const at::Half* scale, const at::Half* zero,
                             float* __restrict__ out, int64_t groups, int64_t group) {
  constexpr int PER_BYTE = 8 / BITS, MASK = (1 << BITS) - 1;
  for (int64_t g = 0; g < groups; ++g) {
    const float step = static_cast<float>(scale[g]), low = static_cast<float>(zero[g]);
    const uint8_t* __restrict__ bytes = packed + g * (group / PER_BYTE);
    float* __restrict__ values = out + g * group;
    for (int64_t c = 0; c < group; ++c) {
      const float product = static_cast<float>((bytes[c / PER_BYTE] >> ((c % PER_BYTE) * BITS)) & MASK) * step;
      values[c] = product + low;
    }
  }
}

torch::Tensor dequantize_ring(torch::Tensor packed, torch::Tensor scale, torch::Tensor zero, int64_t bits, int64_t start) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "bits must be 2, 4 or 8");
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.dim() == 5 && packed.is_contiguous(),
              "packed: contiguous uint8 [batch, heads, n, groups, bytes]");
  TORCH_CHECK(scale.scalar_type() == torch::kHalf && zero.scalar_type() == torch::kHalf && scale.is_contiguous() &&
              zero.is_contiguous() && scale.numel() == packed.numel() / packed.size(4) && zero.numel() == scale.numel(),
              "scale, zero: contiguous fp16 [batch, heads, n, groups, 1]");
  const int64_t rows = packed.size(0) * packed.size(1), n = packed.size(2), groups = packed.size(3), width = packed.size(4);
  TORCH_CHECK(n > 0 && start >= 0 && start < n, "start must index the ring");
  const int64_t dim = groups * width * (8 / bits);
  auto out = torch::empty({packed.size(0), packed.size(1), n, dim}, packed.options().dtype(torch::kFloat32));
  const uint8_t* all_packed = packed.data_ptr<uint8_t>();
  const at::Half* all_scale = scale.data_ptr<at::Half>();
  const at::Half* all_zero = zero.data_ptr<at::Half>();
  float* all_out = out.data_ptr<float>();
  at::parallel_for(0, rows * n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / n, token = item % n, slot = row * n + (start + token) % n;
      const uint8_t* codes = all_packed + slot * groups * width;
      const at::Half *step = all_scale + slot * groups, *low = all_zero + slot * groups;
      float* values = all_out + item * dim;
      if (bits == 2) dequantize_token<2>(codes, step, low, values, groups, dim / groups);
      else if (bits == 4) dequantize_token<4>(codes, step, low, values, groups, dim / groups);
      else dequantize_token<8>(codes, step, low, values, groups, dim / groups);
    }
  });
  return out;
}

// Quantize one new token per row into ring slot `slot` in place, as quant.py's quantize_tokens does
// per group of `group` channels: fp16 scale (max - min) / levels (at least eps) and zero-point min,
// codes round((x - zero) / scale) (half to even) clamped to the levels, packed low bits first.
// x fp32 [batch, heads, 1, groups * group]; packed, scale, zero: the ring (as for dequantize_ring).
__attribute__((optimize("fp-contract=off")))
static void quantize_group(const float* x, int64_t group, int bits, double eps, uint8_t* packed, at::Half* scale,
                           at::Half* zero) {
  const int per_byte = 8 / bits, levels = (1 << bits) - 1;
  float low = x[0], high = x[0];
  for (int64_t c = 1; c < group; ++c) low = std::min(low, x[c]), high = std::max(high, x[c]);
  const float spread = (high - low) / static_cast<float>(levels);
  const at::Half step = at::Half(std::max(spread, static_cast<float>(eps))), base = at::Half(low);
  *scale = step, *zero = base;
  const float step_f = static_cast<float>(step), base_f = static_cast<float>(base);
  for (int64_t byte = 0; byte < group / per_byte; ++byte) {
    int value = 0;
    for (int slot = 0; slot < per_byte; ++slot) {
      const float level = std::nearbyint((x[byte * per_byte + slot] - base_f) / step_f);
      const int code = static_cast<int>(std::min(std::max(level, 0.0f), static_cast<float>(levels)));
      value |= code << (slot * bits);
    }
    packed[byte] = static_cast<uint8_t>(value);
  }
}

void quantize_into_ring(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, torch::Tensor zero, int64_t bits,
                        int64_t slot, double eps) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "bits must be 2, 4 or 8");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.dim() == 4 && x.size(2) == 1,
              "x: contiguous fp32 [batch, heads, 1, dim]");
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.dim() == 5 && packed.is_contiguous() &&
              scale.scalar_type() == torch::kHalf && zero.scalar_type() == torch::kHalf && scale.is_contiguous() &&
              zero.is_contiguous(), "ring: contiguous uint8 codes and fp16 scales");
  const int64_t rows = packed.size(0) * packed.size(1), n = packed.size(2), groups = packed.size(3), width = packed.size(4);
  const int64_t group = width * (8 / bits);
  TORCH_CHECK(x.size(0) * x.size(1) == rows && x.size(3) == groups * group && slot >= 0 && slot < n,
              "x and slot must fit the ring");
  const float* all_x = x.data_ptr<float>();
  uint8_t* all_packed = packed.data_ptr<uint8_t>();
  at::Half* all_scale = scale.data_ptr<at::Half>();
  at::Half* all_zero = zero.data_ptr<at::Half>();
  for (int64_t row = 0; row < rows; ++row)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t at = (row * n + slot) * groups + g;
      quantize_group(all_x + (row * groups + g) * group, group, static_cast<int>(bits), eps, all_packed + at * width,
                     all_scale + at, all_zero + at);
    }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize_into_ring", &quantize_into_ring, "one new token per row, quantized into a ring slot in place");
  m.def("dequantize_ring", &dequantize_ring, "a ring of grouped low-bit tokens, oldest first, as fp32");
  m.def("sketch_scores", &sketch_scores, "query rows against packed low-bit key codes");
  m.def("sketch_choose", &sketch_choose, "one decode step's top-k choice and unread group sums from the sketch");
}

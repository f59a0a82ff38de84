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
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

// One item: `rows` score rows of `group` tokens, accumulated channel by channel (the codes of
// one channel are unpacked once into `level`, then added to every row).
static void score_item(const uint8_t* __restrict__ codes, const float* __restrict__ weights, const float* __restrict__ offsets,
                       float* __restrict__ out, float* __restrict__ level, int64_t rows, int64_t dim, int64_t width,
                       int64_t group, int bits) {
  const int per_byte = 8 / bits, mask = (1 << bits) - 1;
  for (int64_t row = 0; row < rows; ++row)
    for (int64_t t = 0; t < group; ++t) out[row * group + t] = offsets[row];
  for (int64_t byte = 0; byte < width; ++byte) {
    const uint8_t* __restrict__ column = codes + byte * group;
    for (int slot = 0; slot < per_byte; ++slot) {
      const int shift = slot * bits;
      for (int64_t t = 0; t < group; ++t) level[t] = static_cast<float>((column[t] >> shift) & mask);
      for (int64_t row = 0; row < rows; ++row) {
        const float weight = weights[row * dim + byte * per_byte + slot];
        float* __restrict__ acc = out + row * group;
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
    std::vector<float> level(group), scores(rows * group);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item % groups, h = (item / groups) % heads, b = item / (groups * heads);
      const uint8_t* item_codes = all_codes + b * codes.stride(0) + h * codes.stride(1) + g * codes.stride(2);
      score_item(item_codes, all_weights + item * rows * dim, all_offsets + item * rows, scores.data(), level.data(),
                 rows, dim, width, group, static_cast<int>(bits));
      for (int64_t row = 0; row < rows; ++row) {
        float* target = all_out + (b * heads * rows + h * rows + row) * groups * group + g * group;
        std::copy(scores.data() + row * group, scores.data() + (row + 1) * group, target);
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sketch_scores", &sketch_scores, "query rows against packed low-bit key codes");
}

// Update codecs: how a float vector (a model update, or the global weights on the downlink) is
// turned into a proto::EncodedTensor and back, lossless or lossy, plus error feedback for the
// lossy ones.
//
// Codecs are chosen by name:
//   fp32      lossless, 4 bytes per value
//   fp16      IEEE binary16, round to nearest even, |x| > 65504 saturates to +-65504
//   int8      per block: asymmetric min/max quantisation to 256 levels
//   int4      per block: asymmetric min/max quantisation to 16 levels
//   qsgd:s    per block: stochastic quantisation of |x| / max|x| to s levels (1 <= s <= 32767),
//             unbiased (E[decode] = x), reproducible from the seed stored in the tensor
//   sign      per block: 1 bit per value (the sign) and scale = mean |x| of the block
//   topk:f    the ceil(f * n) values of largest magnitude (0 < f <= 1) with their indices
//   topk:f:layer  the same, chosen by |x| / RMS of x over the model layer x belongs to
// Block codecs (int8, int4, qsgd, sign) take a block size (values per block, default 256,
// 1..kMaxBlockSize); the last block may be shorter.
//
// Byte layouts of EncodedTensor.payload (all multi-byte numbers little-endian; n = num_values,
// B = block_size, nb = num_blocks = ceil(n / B)):
//   fp32    n x f32.                                               block_size = num_blocks = k = 0
//   fp16    n x u16 (binary16; exponent 31 = Inf/NaN is rejected). block_size = num_blocks = k = 0
//   int8    nb x {f32 min, f32 scale}, then n x u8 code q;         x = min + scale * q
//   int4    nb x {f32 min, f32 scale}, then ceil(n/2) bytes: value i is the low nibble of
//           byte i/2 for even i, the high nibble for odd i (a final unused nibble is 0);
//                                                                  x = min + scale * q
//           (scale = (max - min) / (levels - 1); so |x - decoded| <= scale / 2 per block,
//           plus float rounding. A block whose range is below 255 * FLT_MIN gets scale 0.)
//   sign    nb x f32 scale, then ceil(n/8) bytes: bit (i % 8) of byte i/8 set means value i
//           is negative (unused bits are 0);                       x = bit ? -scale : +scale
//   qsgd:s  nb x f32 m (= max |x| of the block), then a bit stream of n codes of
//           w = bit_width(s) + 1 bits each, code i in bits [i*w, (i+1)*w) counted from the
//           least significant bit of byte 0 (unused bits are 0). code = 2 * l + negative,
//           0 <= l <= s, the sign bit is 0 when l = 0;             x = +-m * l / s
//           Level l is floor(s |x| / m) plus 1 with probability frac(s |x| / m), drawn from a
//           counter-based hash of (seed, index), so the result does not depend on threads.
//           EncodedTensor.seed records the seed.
//   topk:f  k x u32 index (strictly increasing, < n), then k x f32 value; every other value
//           decodes to 0. k = TopKCount(f, n), so k is implied by the codec name and n.
// Block codecs set block_size = B and num_blocks = nb; topk sets k. Every other of these
// fields must be 0.
//
// Decoding trusts nothing: the caller states how many values it expects (out.size()), and the
// codec name, num_values, block_size, num_blocks, k, the exact payload length, every scale,
// index and code are checked before use; decoded values are finite by construction of the
// checks. A violation is kInvalidArgument with a message naming the field. Nothing is
// allocated on the peer's word.
//
// All functions are thread-safe and never throw. ErrorFeedback is a value type without shared
// state (one per client and run; not thread-safe itself).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "fedslice/common/status.h"
#include "fedslice/wire.pb.h"

namespace fedslice::codec {

enum class CodecKind { kFp32, kFp16, kInt8, kInt4, kQsgd, kSign, kTopK };

inline constexpr uint32_t kDefaultBlockSize = 256;
inline constexpr uint32_t kMaxBlockSize = uint32_t{1} << 20;
inline constexpr uint32_t kMaxQsgdLevels = 32767;

// A parsed, valid codec choice. Build it with ParseCodec.
struct CodecSpec {
  CodecKind kind = CodecKind::kFp32;
  // Name written into EncodedTensor.codec ("fp32", "int8", "qsgd:4", "topk:0.01", ...).
  std::string name = "fp32";
  // Values per block for block codecs (int8, int4, qsgd, sign); 0 for the others.
  uint32_t block_size = 0;
  // qsgd: number of levels s.
  uint32_t levels = 0;
  // topk: fraction f of values kept, 0 < f <= 1.
  double fraction = 0;
  // "topk:f:layer" (opt-in): values are chosen by |x| / RMS of x over their segment (the
  // model layer they belong to) rather than by |x|, so one layer's large updates do not
  // take every slot. `segments` are the sizes of consecutive segments, adding up to the
  // number of values encoded; the caller who knows the layers sets them (empty = one
  // segment: plain topk). The payload is plain topk's; decoding needs no segments.
  // Measured (docs/codecs/topk_error_feedback.md): without the sparse refit, +0.4-0.7 points
  // with 2-label shards and -0.5-0.7 with iid clients; with it (the default), no gain.
  bool per_segment_scale = false;
  std::vector<uint64_t> segments;

  bool lossy() const { return kind != CodecKind::kFp32; }
  bool block_wise() const {
    return kind == CodecKind::kInt8 || kind == CodecKind::kInt4 || kind == CodecKind::kQsgd ||
           kind == CodecKind::kSign;
  }
  // Error feedback is on by default for the codecs whose error is too large to ignore: their
  // biased error would otherwise accumulate into the model (sign, topk).
  bool default_error_feedback() const {
    return kind == CodecKind::kSign || kind == CodecKind::kTopK;
  }
};

// Parses a codec name. `block_size` 0 means kDefaultBlockSize for block codecs; it is ignored
// by the other codecs. An empty name means "fp32" (as in proto::CodecConfig).
// Errors: kInvalidArgument naming the problem: unknown name (valid names listed), qsgd levels
// not an integer in [1, kMaxQsgdLevels], topk fraction not a number in (0, 1] ("topk:f" or
// "topk:f:layer"), block size above kMaxBlockSize.
Result<CodecSpec> ParseCodec(std::string_view name, uint32_t block_size = 0);

// ParseCodec(config.name(), config.block_size()).
Result<CodecSpec> ParseCodec(const proto::CodecConfig& config);

// Whether error feedback is wanted under `config`: its error_feedback flag, or the codec's
// default when the flag is unset (proto3 cannot tell false from unset, so false = default).
bool WantsErrorFeedback(const CodecSpec& spec, const proto::CodecConfig& config);

// Sparse refit (topk only): the last `share` of a client's local steps train only the
// values top-k chose, at `lr_scale` times the learning rate (CodecConfig.sparse_refit).
inline constexpr double kDefaultSparseRefit = 0.6;
inline constexpr double kDefaultSparseRefitLrScale = 4.0;
inline constexpr double kMaxSparseRefitLrScale = 64.0;
struct SparseRefit {
  double share = 0;  // in [0, 1); 0 = off
  double lr_scale = kDefaultSparseRefitLrScale;
  bool on() const { return share > 0; }
};

// The sparse refit `config` asks for, checked: share unset (kDefaultSparseRefit for topk,
// off for the other codecs) or a number in [0, 1), a share above 0 only with a topk codec;
// lr scale in [0, kMaxSparseRefitLrScale] (0 = the default). Errors: kInvalidArgument
// naming the bad field, or the codec's own error.
Result<SparseRefit> ParseSparseRefit(const proto::CodecConfig& config);

// Number of values topk:fraction keeps out of n: ceil(fraction * n), at least 1 when n > 0,
// at most n.
uint64_t TopKCount(double fraction, uint64_t n);

// Exact payload size in bytes of `n` values under `spec` (n <= net::kMaxTensorValues).
uint64_t PayloadBytes(const CodecSpec& spec, uint64_t n);

// Encodes `values` into `*out` (replaced; the payload buffer's capacity is reused). `seed`
// drives qsgd's random rounding (same values + seed = same bytes) and is ignored by the
// other codecs. Errors: kInvalidArgument for a non-finite input value (index named) or more
// than net::kMaxTensorValues values; kResourceExhausted if the payload cannot be allocated.
Status Encode(const CodecSpec& spec, std::span<const float> values, proto::EncodedTensor* out,
              uint64_t seed = 0);

// The indices, ascending, of the values Encode(spec, values) keeps; spec must be a topk
// codec (with its segments, if per-segment). The client's sparse refit trains these. Errors:
// Encode's, and kInvalidArgument for a codec other than topk.
Result<std::vector<uint32_t>> SelectTopK(const CodecSpec& spec, std::span<const float> values);

// Decodes `tensor` into `out`; out.size() is the number of values the receiver expects.
// Errors: kInvalidArgument (see the checks above); `out` may then hold partial data.
Status Decode(const proto::EncodedTensor& tensor, std::span<float> out);

// Error feedback (a.k.a. error compensation): what a lossy codec did not send this round is
// kept and added to the next update, so that over rounds the sum of what was sent tracks the
// sum of the true updates (their difference is exactly the current residual).
//
// The residual is only flushed when its client is sampled, so under partial participation
// (fraction C of the clients per round) it is ~1/C rounds stale when used. For topk:0.01 at
// C = 0.1, topk trails fp32 by 1.6-2 points in the 100-client shards simulation; that gap
// follows the values reaching the server per round (C * clients * f of the model), not the
// staleness: the same 10% per round at C = 1 gives the same gap. The residual must still be
// kept whole: decaying, clipping or resetting it was measured to be worse
// (docs/codecs/topk_error_feedback.md).
//
// Typical use on a client, once per round:
//   FEDSLICE_RETURN_IF_ERROR(feedback.Encode(spec, update, &tensor, seed));
// The residual has the size of the first update seen; Reset() drops it (e.g. a new run).
class ErrorFeedback {
 public:
  // Encodes update + residual with `spec` and sets residual = (update + residual) - decoded.
  // If encoding fails the residual is unchanged. Errors: Encode's, kInvalidArgument when the
  // update's size differs from the residual's or update + residual is not finite (and, from
  // Update, when the new residual overflows: it is then reset to zero).
  Status Encode(const CodecSpec& spec, std::span<const float> update, proto::EncodedTensor* out,
                uint64_t seed = 0);

  // The building blocks of Encode, for callers that encode themselves:
  // Apply adds the residual to `update` in place (sizes the residual on first use).
  Status Apply(std::span<float> update);
  // Sets residual = intended - decoded (the sizes must match each other and the residual).
  Status Update(std::span<const float> intended, std::span<const float> decoded);

  void Reset() { residual_.clear(); }
  std::span<const float> residual() const { return residual_; }

 private:
  std::vector<float> residual_;
  std::vector<float> scratch_;  // update + residual, then reused for the decoded values
  std::vector<float> decoded_;
};

}  // namespace fedslice::codec

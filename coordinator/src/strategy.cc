#include "fedslice/coordinator/strategy.h"

#include <charconv>
#include <cmath>
#include <limits>
#include <new>
#include <string>
#include <vector>

namespace fedslice::coordinator {
namespace {

using Kind = StrategyConfig::Kind;

constexpr Kind kAllKinds[] = {Kind::kFedAvg, Kind::kFedProx, Kind::kFedAvgM, Kind::kFedAdam};

struct OptionSpec {
  std::string_view key;
  double StrategyConfig::*field;
};

// The options each kind takes, in canonical (ToString) order.
std::span<const OptionSpec> OptionsOf(Kind kind) {
  static constexpr OptionSpec kProx[] = {{"mu", &StrategyConfig::mu}};
  static constexpr OptionSpec kAvgM[] = {{"lr", &StrategyConfig::lr},
                                         {"momentum", &StrategyConfig::momentum}};
  static constexpr OptionSpec kAdam[] = {{"lr", &StrategyConfig::lr},
                                         {"beta1", &StrategyConfig::beta1},
                                         {"beta2", &StrategyConfig::beta2},
                                         {"tau", &StrategyConfig::tau}};
  switch (kind) {
    case Kind::kFedAvg:
      return {};
    case Kind::kFedProx:
      return kProx;
    case Kind::kFedAvgM:
      return kAvgM;
    case Kind::kFedAdam:
      return kAdam;
  }
  return {};
}

std::string_view Trim(std::string_view s) {
  const auto is_space = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; };
  while (!s.empty() && is_space(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_space(s.back())) s.remove_suffix(1);
  return s;
}

// Shortest decimal form that parses back to the same double.
std::string FormatDouble(double v) {
  char buf[64];
  const auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), v);
  if (ec != std::errc()) return std::to_string(v);
  return std::string(buf, end);
}

std::string KeyList(Kind kind) {
  std::string out;
  for (const OptionSpec& o : OptionsOf(kind)) {
    if (!out.empty()) out += ", ";
    out += o.key;
  }
  return out;
}

Status CheckRange(std::string_view kind, std::string_view key, double v, bool (*ok)(double),
                  std::string_view range) {
  if (std::isfinite(v) && ok(v)) return Status::Ok();
  return Status::InvalidArgument(std::string(kind) + ": " + std::string(key) + " must be " +
                                 std::string(range) + ", got " + FormatDouble(v));
}

// True when `x` converts to a finite float32 (the cast itself would be undefined otherwise).
bool FitsFloat(double x) {
  return std::isfinite(x) && std::abs(x) <= static_cast<double>(std::numeric_limits<float>::max());
}

// ---------------------------------------------------------------------------------------------
// Shared by all four strategies: the running sample-weighted sum of deltas, in double.
// Subclasses turn the mean delta into new weights (Step) and own any optimiser
// state. FinishRound runs Step twice over the model: a checking pass that writes
// nothing, then a committing pass, so a round that would overflow leaves everything as it
// was without needing a second model-sized scratch buffer.
class AveragingStrategy : public Strategy {
 public:
  AveragingStrategy(const StrategyConfig& config, size_t num_params)
      : config_(config), num_params_(num_params), sum_(num_params, 0.0) {}

  std::string_view name() const override { return StrategyConfig::KindName(config_.kind); }
  const StrategyConfig& config() const override { return config_; }
  size_t num_params() const override { return num_params_; }

  Status BeginRound(std::span<const float> global) override {
    open_ = false;
    if (global.size() != num_params_) {
      return Status::InvalidArgument("BeginRound: global model has " +
                                     std::to_string(global.size()) + " parameters, expected " +
                                     std::to_string(num_params_));
    }
    std::fill(sum_.begin(), sum_.end(), 0.0);
    count_ = 0;
    total_samples_ = 0;
    open_ = true;
    return Status::Ok();
  }

  Status Accumulate(std::span<const float> delta, uint64_t num_samples) override {
    if (!open_) return Status::FailedPrecondition("Accumulate called outside a round");
    if (delta.size() != num_params_) {
      return Status::InvalidArgument("update has " + std::to_string(delta.size()) +
                                     " values, the model has " + std::to_string(num_params_));
    }
    if (num_samples == 0) return Status::InvalidArgument("update claims 0 training samples");
    if (num_samples > kMaxSamplesPerUpdate) {
      return Status::InvalidArgument("update claims " + std::to_string(num_samples) +
                                     " training samples, more than the limit of " +
                                     std::to_string(kMaxSamplesPerUpdate));
    }
    // Validate everything before touching the sum: a rejected update leaves no trace.
    for (size_t i = 0; i < delta.size(); ++i) {
      if (!std::isfinite(delta[i])) {
        return Status::InvalidArgument("update value " + std::to_string(i) + " is " +
                                       (std::isnan(delta[i]) ? "NaN" : "infinite"));
      }
    }
    // float * (n < 2^30) is exact in double, so only the additions round.
    const double w = static_cast<double>(num_samples);
    double* sum = sum_.data();
    const float* d = delta.data();
    for (size_t i = 0; i < num_params_; ++i) sum[i] += static_cast<double>(d[i]) * w;
    ++count_;
    total_samples_ += num_samples;
    return Status::Ok();
  }

  size_t num_accumulated() const override { return count_; }
  uint64_t total_samples() const override { return total_samples_; }

  Status FinishRound(std::span<float> global) override {
    if (!open_) return Status::FailedPrecondition("FinishRound called outside a round");
    if (count_ == 0) {
      return Status::FailedPrecondition("FinishRound: no update was accumulated this round");
    }
    if (global.size() != num_params_) {
      return Status::InvalidArgument("FinishRound: global model has " +
                                     std::to_string(global.size()) + " parameters, expected " +
                                     std::to_string(num_params_));
    }
    const double total = static_cast<double>(total_samples_);
    const size_t bad = Step(sum_.data(), total, global.data(), /*commit=*/false);
    if (bad != num_params_) {
      return Status::OutOfRange("FinishRound: the " + std::string(name()) +
                                " step makes parameter " + std::to_string(bad) +
                                " (or its optimiser state) overflow float32; round not applied");
    }
    Step(sum_.data(), total, global.data(), /*commit=*/true);
    ++step_;
    open_ = false;
    return Status::Ok();
  }

  proto::StrategyState SaveState() const override {
    proto::StrategyState state;
    state.set_kind(std::string(name()));
    state.set_config(config_.ToString());
    state.set_num_params(num_params_);
    state.set_step(step_);
    SaveVectors(state);
    return state;
  }

  Status LoadState(const proto::StrategyState& state) override {
    const std::string context = "loading " + std::string(name()) + " strategy state";
    if (state.kind() != name()) {
      return Status::InvalidArgument(context + ": the state belongs to strategy '" + state.kind() +
                                     "'");
    }
    if (state.config() != config_.ToString()) {
      return Status::InvalidArgument(context + ": the state was saved by '" + state.config() +
                                     "', this run uses '" + config_.ToString() + "'");
    }
    if (state.num_params() != num_params_) {
      return Status::InvalidArgument(context + ": the state is for " +
                                     std::to_string(state.num_params()) +
                                     " parameters, the model has " + std::to_string(num_params_));
    }
    FEDSLICE_RETURN_IF_ERROR(LoadVectors(state).WithContext(context));
    step_ = state.step();
    open_ = false;
    return Status::Ok();
  }

 protected:
  // Applies the mean delta sum[i] / total to every parameter. With commit=false only checks
  // that the new weights and state are finite in float32 and returns the index of the first
  // that is not (num_params_ if all are); with commit=true writes them.
  virtual size_t Step(const double* sum, double total, float* global, bool commit) = 0;
  // Optimiser vectors to / from the proto (LoadVectors validates and must not change
  // anything on failure).
  virtual void SaveVectors(proto::StrategyState& state) const = 0;
  virtual Status LoadVectors(const proto::StrategyState& state) = 0;

  // Copies a proto vector into `out` after checking its size, finiteness and (for variances)
  // sign; `out` is untouched on failure.
  Status CheckVector(const google::protobuf::RepeatedField<float>& in, std::string_view what,
                     bool non_negative) const {
    if (static_cast<size_t>(in.size()) != num_params_) {
      return Status::InvalidArgument(std::string(what) + " has " + std::to_string(in.size()) +
                                     " values, expected " + std::to_string(num_params_));
    }
    for (int i = 0; i < in.size(); ++i) {
      if (!std::isfinite(in[i]) || (non_negative && in[i] < 0)) {
        return Status::InvalidArgument(std::string(what) + " value " + std::to_string(i) +
                                       " is invalid (" + std::to_string(in[i]) + ")");
      }
    }
    return Status::Ok();
  }
  Status CheckEmpty(const proto::StrategyState& state) const {
    if (state.first_moment_size() != 0 || state.second_moment_size() != 0) {
      return Status::InvalidArgument(std::string(name()) + " keeps no optimiser vectors");
    }
    return Status::Ok();
  }

  const StrategyConfig config_;
  const size_t num_params_;

 private:
  std::vector<double> sum_;  // sum over updates of num_samples * delta, num_params_ values
  size_t count_ = 0;
  uint64_t total_samples_ = 0;
  uint64_t step_ = 0;
  bool open_ = false;
};

// Runs Derived::Compute (inlined, no virtual call per parameter) over the model.
template <typename Derived>
class StrategyImpl : public AveragingStrategy {
 public:
  using AveragingStrategy::AveragingStrategy;

 protected:
  size_t Step(const double* sum, double total, float* global, bool commit) final {
    auto& self = static_cast<Derived&>(*this);
    for (size_t i = 0; i < num_params_; ++i) {
      if (!self.Compute(i, sum[i] / total, global[i], commit)) return i;
    }
    return num_params_;
  }
};

// FedAvg (McMahan et al. 2017) and FedProx (Li et al. 2020) aggregate alike:
// w <- w + sum_k n_k delta_k / sum_k n_k. FedProx differs only on the clients, which add
// the proximal term (mu/2)||w - w_global||^2 to their loss.
class FedAvgStrategy final : public StrategyImpl<FedAvgStrategy> {
 public:
  using StrategyImpl::StrategyImpl;
  float proximal_mu() const override {
    return config_.kind == Kind::kFedProx ? static_cast<float>(config_.mu) : 0.0f;
  }

 protected:
  friend class StrategyImpl<FedAvgStrategy>;
  // The new weight from the mean delta; commit=false only checks that it is finite in float32.
  bool Compute(size_t, double mean_delta, float& weight, bool commit) {
    const double w = static_cast<double>(weight) + mean_delta;
    if (!commit) return FitsFloat(w);
    weight = static_cast<float>(w);
    return true;
  }
  void SaveVectors(proto::StrategyState&) const override {}
  Status LoadVectors(const proto::StrategyState& state) override { return CheckEmpty(state); }
};

// FedAvgM (Hsu et al. 2019): server momentum on the mean delta.
//   v <- beta v + delta;  w <- w + eta v
class FedAvgMStrategy final : public StrategyImpl<FedAvgMStrategy> {
 public:
  FedAvgMStrategy(const StrategyConfig& config, size_t num_params)
      : StrategyImpl(config, num_params), velocity_(num_params, 0.0f) {}

 protected:
  friend class StrategyImpl<FedAvgMStrategy>;
  bool Compute(size_t i, double mean_delta, float& weight, bool commit) {
    const double v = config_.momentum * static_cast<double>(velocity_[i]) + mean_delta;
    const double w = static_cast<double>(weight) + config_.lr * v;
    if (!commit) return FitsFloat(v) && FitsFloat(w);
    velocity_[i] = static_cast<float>(v);
    weight = static_cast<float>(w);
    return true;
  }
  void SaveVectors(proto::StrategyState& state) const override {
    state.mutable_first_moment()->Assign(velocity_.begin(), velocity_.end());
  }
  Status LoadVectors(const proto::StrategyState& state) override {
    FEDSLICE_RETURN_IF_ERROR(CheckVector(state.first_moment(), "momentum", false));
    if (state.second_moment_size() != 0) {
      return Status::InvalidArgument("fedavgm keeps no second moment");
    }
    velocity_.assign(state.first_moment().begin(), state.first_moment().end());
    return Status::Ok();
  }

 private:
  std::vector<float> velocity_;
};

// FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2), without bias
// correction, as in the paper:
//   m <- b1 m + (1 - b1) delta;  v <- b2 v + (1 - b2) delta^2;  w <- w + eta m / (sqrt(v) + tau)
// m starts at 0 and v at tau^2 (the paper's v_{-1} >= tau^2), so the first steps are not
// full-size sign steps in coordinates whose deltas are tiny.
class FedAdamStrategy final : public StrategyImpl<FedAdamStrategy> {
 public:
  FedAdamStrategy(const StrategyConfig& config, size_t num_params)
      : StrategyImpl(config, num_params),
        m_(num_params, 0.0f),
        v_(num_params, static_cast<float>(config.tau * config.tau)) {}

 protected:
  friend class StrategyImpl<FedAdamStrategy>;
  bool Compute(size_t i, double mean_delta, float& weight, bool commit) {
    const double m = config_.beta1 * static_cast<double>(m_[i]) + (1 - config_.beta1) * mean_delta;
    const double v =
        config_.beta2 * static_cast<double>(v_[i]) + (1 - config_.beta2) * mean_delta * mean_delta;
    const double w = static_cast<double>(weight) + config_.lr * m / (std::sqrt(v) + config_.tau);
    if (!commit) return FitsFloat(m) && FitsFloat(v) && FitsFloat(w);
    m_[i] = static_cast<float>(m);
    v_[i] = static_cast<float>(v);
    weight = static_cast<float>(w);
    return true;
  }
  void SaveVectors(proto::StrategyState& state) const override {
    state.mutable_first_moment()->Assign(m_.begin(), m_.end());
    state.mutable_second_moment()->Assign(v_.begin(), v_.end());
  }
  Status LoadVectors(const proto::StrategyState& state) override {
    FEDSLICE_RETURN_IF_ERROR(CheckVector(state.first_moment(), "first moment", false));
    FEDSLICE_RETURN_IF_ERROR(CheckVector(state.second_moment(), "second moment", true));
    m_.assign(state.first_moment().begin(), state.first_moment().end());
    v_.assign(state.second_moment().begin(), state.second_moment().end());
    return Status::Ok();
  }

 private:
  std::vector<float> m_;
  std::vector<float> v_;
};

}  // namespace

std::string_view StrategyConfig::KindName(Kind kind) {
  switch (kind) {
    case Kind::kFedAvg:
      return "fedavg";
    case Kind::kFedProx:
      return "fedprox";
    case Kind::kFedAvgM:
      return "fedavgm";
    case Kind::kFedAdam:
      return "fedadam";
  }
  return "unknown";
}

StrategyConfig StrategyConfig::Defaults(Kind kind) {
  StrategyConfig c;
  c.kind = kind;
  c.lr = kind == Kind::kFedAdam ? 1e-2 : 1.0;
  return c;
}

Status StrategyConfig::Validate() const {
  const std::string_view k = KindName(kind);
  const auto positive = [](double v) { return v > 0; };
  const auto non_negative = [](double v) { return v >= 0; };
  const auto unit = [](double v) { return v >= 0 && v < 1; };
  switch (kind) {
    case Kind::kFedAvg:
      return Status::Ok();
    case Kind::kFedProx:
      return CheckRange(k, "mu", mu, +non_negative, ">= 0");
    case Kind::kFedAvgM:
      FEDSLICE_RETURN_IF_ERROR(CheckRange(k, "lr", lr, +positive, "> 0"));
      return CheckRange(k, "momentum", momentum, +unit, "in [0, 1)");
    case Kind::kFedAdam:
      FEDSLICE_RETURN_IF_ERROR(CheckRange(k, "lr", lr, +positive, "> 0"));
      FEDSLICE_RETURN_IF_ERROR(CheckRange(k, "beta1", beta1, +unit, "in [0, 1)"));
      FEDSLICE_RETURN_IF_ERROR(CheckRange(k, "beta2", beta2, +unit, "in [0, 1)"));
      return CheckRange(k, "tau", tau, +positive, "> 0");
  }
  return Status::InvalidArgument("unknown strategy kind");
}

Result<StrategyConfig> StrategyConfig::Parse(std::string_view text) {
  const std::string context = "strategy '" + std::string(text) + "'";
  const auto fail = [&](const std::string& why) {
    return Status::InvalidArgument(context + ": " + why);
  };
  text = Trim(text);
  const size_t colon = text.find(':');
  const std::string_view name = Trim(text.substr(0, colon));

  StrategyConfig config;
  bool found = false;
  for (Kind kind : kAllKinds) {
    if (name == KindName(kind)) {
      config = Defaults(kind);
      found = true;
    }
  }
  if (!found) {
    return fail("unknown strategy name '" + std::string(name) +
                "'; expected one of fedavg, fedprox, fedavgm, fedadam");
  }
  if (colon == std::string_view::npos) return config;

  const std::span<const OptionSpec> options = OptionsOf(config.kind);
  if (options.empty()) return fail(std::string(name) + " takes no options");
  std::string_view rest = text.substr(colon + 1);
  std::vector<std::string_view> seen;
  for (;;) {
    const size_t comma = rest.find(',');
    const std::string_view item = Trim(rest.substr(0, comma));
    const size_t eq = item.find('=');
    if (item.empty() || eq == std::string_view::npos) {
      return fail("expected key=value, got '" + std::string(item) +
                  "' (options: " + KeyList(config.kind) + ")");
    }
    const std::string_view key = Trim(item.substr(0, eq));
    const std::string_view value = Trim(item.substr(eq + 1));
    const OptionSpec* spec = nullptr;
    for (const OptionSpec& o : options) {
      if (o.key == key) spec = &o;
    }
    if (spec == nullptr) {
      return fail("unknown option '" + std::string(key) + "' for " + std::string(name) +
                  " (options: " + KeyList(config.kind) + ")");
    }
    for (std::string_view s : seen) {
      if (s == key) return fail("option '" + std::string(key) + "' given twice");
    }
    seen.push_back(key);
    double v = 0;
    const auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), v);
    if (value.empty() || ec != std::errc() || end != value.data() + value.size()) {
      return fail("option '" + std::string(key) + "': '" + std::string(value) +
                  "' is not a number");
    }
    config.*(spec->field) = v;
    if (comma == std::string_view::npos) break;
    rest = rest.substr(comma + 1);
  }
  Status valid = config.Validate();
  if (!valid.ok()) return valid.WithContext(context);
  return config;
}

std::string StrategyConfig::ToString() const {
  std::string out(KindName(kind));
  char sep = ':';
  for (const OptionSpec& o : OptionsOf(kind)) {
    out += sep;
    out += o.key;
    out += '=';
    out += FormatDouble(this->*(o.field));
    sep = ',';
  }
  return out;
}

Result<std::unique_ptr<Strategy>> MakeStrategy(const StrategyConfig& config, size_t num_params) {
  FEDSLICE_RETURN_IF_ERROR(config.Validate());
  if (num_params == 0) return Status::InvalidArgument("MakeStrategy: the model has 0 parameters");
  try {
    switch (config.kind) {
      case Kind::kFedAvg:
      case Kind::kFedProx:
        return std::unique_ptr<Strategy>(new FedAvgStrategy(config, num_params));
      case Kind::kFedAvgM:
        return std::unique_ptr<Strategy>(new FedAvgMStrategy(config, num_params));
      case Kind::kFedAdam:
        return std::unique_ptr<Strategy>(new FedAdamStrategy(config, num_params));
    }
  } catch (const std::bad_alloc&) {
    return Status::ResourceExhausted("MakeStrategy: cannot allocate aggregation buffers for " +
                                     std::to_string(num_params) + " parameters");
  } catch (const std::length_error&) {
    return Status::ResourceExhausted("MakeStrategy: " + std::to_string(num_params) +
                                     " parameters is too many");
  }
  return Status::InvalidArgument("MakeStrategy: unknown strategy kind");
}

}  // namespace fedslice::coordinator

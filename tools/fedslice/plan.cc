// `fedslice plan`: splits a model over a chain of (possibly emulated) devices and prints the
// planner's table (slicing/planner.h).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "cli.h"
#include "commands.h"
#include "fedslice/common/model_io.h"
#include "fedslice/common/model_zoo.h"
#include "fedslice/common/threading.h"
#include "fedslice/slicing/chain.h"
#include "fedslice/slicing/cost.h"
#include "fedslice/slicing/planner.h"

namespace fedslice::cli {
namespace {

// A device as given on the command line; unset fields take the shared defaults.
struct DeviceFlags {
  std::string name;
  double slowdown = 1.0;
  std::optional<double> memory, bandwidth, latency_ms, gflops, overhead_ms;
  std::optional<int> threads;
};

// Parses a non-negative finite number followed by one of `units` (suffix -> multiplier).
// An empty suffix is allowed only when `units` lists "".
Result<double> ParseQuantity(const std::string& what, const std::string& text,
                             const std::vector<std::pair<std::string, double>>& units) {
  const char* begin = text.c_str();
  char* end = nullptr;
  const double value = std::strtod(begin, &end);
  std::string suffix(end);
  if (end == begin || !std::isfinite(value) || value < 0) {
    return Status::InvalidArgument(what + ": '" + text + "' is not a non-negative number");
  }
  std::string known;
  for (const auto& [unit, factor] : units) {
    if (suffix == unit) return value * factor;
    known += (known.empty() ? "" : ", ") + (unit.empty() ? std::string("(none)") : unit);
  }
  return Status::InvalidArgument(what + ": unknown unit in '" + text + "' (use " + known + ")");
}

const std::vector<std::pair<std::string, double>> kByteUnits = {{"B", 1},
                                                                {"KB", 1024},
                                                                {"MB", 1024.0 * 1024},
                                                                {"GB", 1024.0 * 1024 * 1024},
                                                                {"KiB", 1024},
                                                                {"MiB", 1024.0 * 1024},
                                                                {"GiB", 1024.0 * 1024 * 1024}};

Result<double> ParseBytes(const std::string& what, const std::string& text) {
  return ParseQuantity(what, text, kByteUnits);
}

Result<double> ParseBandwidth(const std::string& what, const std::string& text) {
  std::vector<std::pair<std::string, double>> units;
  for (const auto& [unit, factor] : kByteUnits) units.emplace_back(unit + "/s", factor);
  return ParseQuantity(what, text, units);
}

Result<double> ParseMs(const std::string& what, const std::string& text) {
  return ParseQuantity(what, text, {{"ms", 1}, {"us", 1e-3}, {"s", 1000}});
}

Result<double> ParsePlain(const std::string& what, const std::string& text) {
  return ParseQuantity(what, text, {{"", 1}});
}

// "name=a,slowdown=4,memory=64MB,bandwidth=1GB/s,latency=0.2ms,gflops=20,threads=1,
// overhead=0.1ms".
Result<DeviceFlags> ParseDevice(const std::string& text) {
  DeviceFlags d;
  size_t pos = 0;
  while (pos <= text.size()) {
    const size_t comma = std::min(text.find(',', pos), text.size());
    const std::string item = text.substr(pos, comma - pos);
    pos = comma + 1;
    if (item.empty()) continue;
    const size_t eq = item.find('=');
    if (eq == std::string::npos) {
      return Status::InvalidArgument("--device '" + text + "': '" + item + "' is not key=value");
    }
    const std::string key = item.substr(0, eq), value = item.substr(eq + 1);
    const std::string what = "--device " + key;
    if (key == "name") {
      d.name = value;
    } else if (key == "slowdown") {
      FEDSLICE_ASSIGN_OR_RETURN(d.slowdown, ParsePlain(what, value));
      if (d.slowdown < 1) return Status::InvalidArgument(what + " must be >= 1");
    } else if (key == "memory") {
      FEDSLICE_ASSIGN_OR_RETURN(d.memory, ParseBytes(what, value));
    } else if (key == "bandwidth") {
      FEDSLICE_ASSIGN_OR_RETURN(d.bandwidth, ParseBandwidth(what, value));
    } else if (key == "latency") {
      FEDSLICE_ASSIGN_OR_RETURN(d.latency_ms, ParseMs(what, value));
    } else if (key == "overhead") {
      FEDSLICE_ASSIGN_OR_RETURN(d.overhead_ms, ParseMs(what, value));
    } else if (key == "gflops") {
      FEDSLICE_ASSIGN_OR_RETURN(d.gflops, ParsePlain(what, value));
      if (*d.gflops <= 0) return Status::InvalidArgument(what + " must be > 0");
    } else if (key == "threads") {
      FEDSLICE_ASSIGN_OR_RETURN(double t, ParsePlain(what, value));
      if (t < 1 || t > 1024 || t != std::floor(t)) {
        return Status::InvalidArgument(what + " must be an integer in [1, 1024]");
      }
      d.threads = static_cast<int>(t);
    } else {
      return Status::InvalidArgument(
          "--device: unknown key '" + key +
          "' (known: name, slowdown, memory, bandwidth, latency, gflops, threads, overhead)");
    }
  }
  return d;
}

}  // namespace

int RunPlan(int argc, char** argv) {
  const std::string command = "plan";
  std::string model_name, model_file, order = "any";
  std::vector<std::string> device_texts;
  int num_devices = 0, micro_batch = 64, in_flight = 2, threads = 0;
  double slowdown = 1.0;
  std::string memory = "0B", bandwidth = "1GB/s", latency = "0.2ms";
  std::optional<double> gflops;
  bool profile = false, split_layers = false;
  po::options_description options;
  options.add_options()("model", po::value(&model_name), "built-in model: mlp | cnn")(
      "model-file", po::value(&model_file), "a saved model file (spec + weights)")(
      "device", po::value(&device_texts)->composing(),
      "a device, repeatable, in pipeline-candidate order: name=a,slowdown=4,memory=64MB,"
      "bandwidth=1GB/s,latency=0.2ms,gflops=20,threads=1,overhead=0.1ms (unset keys take "
      "the defaults below)")("devices", po::value(&num_devices),
                             "K identical devices (instead of --device)")(
      "slowdown", po::value(&slowdown)->default_value(1.0, "1"),
      "default emulation factor: a device N times slower than this host")(
      "memory", po::value(&memory)->default_value("0B"),
      "default memory budget per device (0 = no limit), e.g. 64MB")(
      "bandwidth", po::value(&bandwidth)->default_value("1GB/s"),
      "default link bandwidth to the next stage")(
      "latency", po::value(&latency)->default_value("0.2ms"), "default link latency")(
      "gflops", po::value<double>()->notifier([&](double g) { gflops = g; }),
      "default device speed for the FLOPs model (default: this host's GEMM rate / slowdown)")(
      "micro-batch", po::value(&micro_batch)->default_value(64), "samples per micro-batch")(
      "profile", po::bool_switch(&profile),
      "time each layer on this host (scaled by each device's slowdown) instead of FLOPs")(
      "split-layers", po::bool_switch(&split_layers),
      "let the planner cut heavy layers into parts, as the coordinator does for split "
      "inference (slicing/chain.h); the table then lists units such as conv2[12/53]")(
      "order", po::value(&order)->default_value("any"),
      "any: the planner picks devices and their order | given: keep the --device order")(
      "in-flight", po::value(&in_flight)->default_value(2),
      "micro-batches a stage buffers per direction (memory model)")(
      "threads", po::value(&threads)->default_value(0),
      "engine threads of this host for --profile and the FLOPS measurement (0 = all cores)");
  int exit_code = kExitOk;
  auto vm = ParseOrExit(command,
                        "--model mlp|cnn | --model-file F  (--device SPEC ... | --devices K) "
                        "[--slowdown N] [--micro-batch M] [--profile] [--split-layers]",
                        options, argc, argv, &exit_code);
  if (!vm) return exit_code;
  auto usage = [&](const std::string& message) {
    PrintError(command, message);
    return kExitUsage;
  };
  if (model_name.empty() == model_file.empty()) {
    return usage("give exactly one of --model and --model-file");
  }
  if (device_texts.empty() == (num_devices == 0)) {
    return usage("give either --device (repeatable) or --devices K");
  }
  if (num_devices < 0 || num_devices > slicing::kMaxDevices) {
    return usage("--devices must be in [1, " + std::to_string(slicing::kMaxDevices) + "]");
  }
  if (!std::isfinite(slowdown) || slowdown < 1) return usage("--slowdown must be >= 1");
  if (gflops && !(std::isfinite(*gflops) && *gflops > 0)) return usage("--gflops must be > 0");
  if (order != "any" && order != "given") return usage("--order must be 'any' or 'given'");
  if (micro_batch < 1) return usage("--micro-batch must be >= 1");
  if (threads < 0) return usage("--threads must be >= 0 (0 = all cores)");
  if (threads > 0) SetNumThreads(threads);

  // Shared defaults, then one DeviceFlags per device.
  DeviceFlags defaults;
  defaults.slowdown = slowdown;
  defaults.gflops = gflops;
  {
    auto m = ParseBytes("--memory", memory);
    auto b = ParseBandwidth("--bandwidth", bandwidth);
    auto l = ParseMs("--latency", latency);
    for (const Status& s : {m.status(), b.status(), l.status()}) {
      if (!s.ok()) return usage(s.message());
    }
    defaults.memory = *m;
    defaults.bandwidth = *b;
    defaults.latency_ms = *l;
  }
  if (*defaults.bandwidth <= 0) return usage("--bandwidth must be > 0");
  std::vector<DeviceFlags> flags;
  for (int k = 0; k < num_devices; ++k) {
    flags.push_back(defaults);
    flags.back().name = "dev" + std::to_string(k);
  }
  for (const std::string& text : device_texts) {
    auto d = ParseDevice(text);
    if (!d.ok()) return usage(d.status().message());
    DeviceFlags f = *d;
    if (f.name.empty()) f.name = "dev" + std::to_string(flags.size());
    if (text.find("slowdown=") == std::string::npos) f.slowdown = defaults.slowdown;
    if (!f.memory) f.memory = defaults.memory;
    if (!f.bandwidth) f.bandwidth = defaults.bandwidth;
    if (!f.latency_ms) f.latency_ms = defaults.latency_ms;
    if (!f.gflops) f.gflops = defaults.gflops;
    if (*f.bandwidth <= 0) return usage("--device " + f.name + ": bandwidth must be > 0");
    flags.push_back(std::move(f));
  }
  if (flags.size() > static_cast<size_t>(slicing::kMaxDevices)) {
    return usage("at most " + std::to_string(slicing::kMaxDevices) + " devices");
  }

  std::optional<Model> model;
  if (!model_name.empty()) {
    auto spec = BuiltinSpec(model_name);
    if (!spec.ok()) return usage(spec.status().message());
    auto built = Model::Create(*spec);
    if (!built.ok()) {
      PrintError(command, built.status().ToString());
      return kExitFailure;
    }
    model = std::move(built).value();
  } else {
    auto loaded = LoadModel(model_file);
    if (!loaded.ok()) {
      PrintError(command, loaded.status().ToString());
      return kExitFailure;
    }
    model = std::move(loaded).value();
  }
  const auto costs = slicing::ComputeLayerCosts(*model);

  // Host measurements, shared by every emulated device: layer times with --profile, GEMM
  // FLOPS when some device has no gflops of its own.
  std::vector<proto::LayerTiming> timings;
  if (profile) {
    slicing::TimingOptions timing;
    timing.batch = std::min(micro_batch, 4096);
    auto measured = slicing::MeasureLayerTimes(*model, timing);
    if (!measured.ok()) {
      PrintError(command, measured.status().ToString());
      return kExitFailure;
    }
    timings = std::move(measured).value();
  }
  double host_flops = 0;
  for (const DeviceFlags& f : flags) {
    if (!profile && !f.gflops && host_flops == 0) host_flops = slicing::MeasureGemmFlops();
  }

  std::vector<slicing::Device> devices;
  for (const DeviceFlags& f : flags) {
    proto::DeviceProfile p;
    p.set_device_name(f.name);
    p.set_slowdown(f.slowdown);
    p.set_flops(f.gflops ? *f.gflops * 1e9 : host_flops);
    p.set_memory_budget_bytes(static_cast<uint64_t>(*f.memory));
    p.set_link_bandwidth_bytes_per_s(*f.bandwidth);
    p.set_link_latency_ms(*f.latency_ms);
    p.set_num_threads(static_cast<uint32_t>(f.threads.value_or(NumThreads())));
    for (const auto& t : timings) *p.add_layer_timings() = t;
    // latency=0 must stay 0, not fall back to a default: pass this device's own figures.
    auto d =
        slicing::DeviceFromProfile(p, costs, slicing::LinkDefaults{*f.bandwidth, *f.latency_ms});
    if (!d.ok()) return usage(d.status().message());
    d->overhead_ms = f.overhead_ms.value_or(0);
    devices.push_back(std::move(d).value());
  }

  slicing::PlanOptions plan_options;
  plan_options.micro_batch = micro_batch;
  plan_options.in_flight = in_flight;
  plan_options.order = order == "any" ? slicing::DeviceOrder::kAny : slicing::DeviceOrder::kGiven;
  int64_t params = 0;
  for (const auto& c : costs) params += c.param_bytes;
  std::printf("model %s: %d layers, %s of parameters; %zu devices; times from %s\n",
              model->spec().name().c_str(), model->num_layers(),
              slicing::FormatBytes(static_cast<double>(params)).c_str(), devices.size(),
              profile ? "layer timings measured on this host x slowdown" : "FLOPs / device GFLOPS");
  for (const DeviceFlags& f : flags) {
    char speed[64] = "layer times measured";
    if (!profile) {
      std::snprintf(speed, sizeof speed, "%.2f GFLOPS effective",
                    (f.gflops ? *f.gflops : host_flops / 1e9) / f.slowdown);
    }
    std::printf("  %-12s slowdown %g, %s, memory %s, link %s/s + %g ms\n", f.name.c_str(),
                f.slowdown, speed,
                *f.memory == 0 ? "no limit" : slicing::FormatBytes(*f.memory).c_str(),
                slicing::FormatBytes(*f.bandwidth).c_str(), *f.latency_ms);
  }
  // With --split-layers the planner places units, as the coordinator's pipeline service does:
  // heavy layers cut for up to as many stages as there are devices (AutoSplit), each unit
  // timed as its share of its layer, plus the join a stage beginning inside a cut layer pays.
  std::vector<slicing::LayerCost> planned = costs;
  if (split_layers) {
    auto chain = slicing::Chain::Create(
        model->spec(), slicing::AutoSplit(model->spec(), costs, static_cast<int>(devices.size()),
                                          plan_options.micro_batch));
    if (!chain.ok()) {
      PrintError(command, "cannot cut the model: " + chain.status().ToString());
      return kExitFailure;
    }
    planned = chain->UnitCosts(costs);
    for (slicing::Device& d : devices) d = chain->UnitDevice(d);
  }
  auto plan = slicing::PlanPipeline(planned, devices, plan_options);
  if (!plan.ok()) {
    PrintError(command, plan.status().ToString());
    return plan.status().code() == Status::Code::kInvalidArgument ? kExitUsage : kExitFailure;
  }
  std::printf("\n%s", slicing::FormatPlan(*plan, planned).c_str());
  return kExitOk;
}

}  // namespace fedslice::cli

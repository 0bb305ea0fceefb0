// speckv's exported controller called from C++ through ONNX Runtime's C++ API.
//
//   choose_gamma CONTROLLER.onnx                  < decisions   one session, the whole file
//   choose_gamma LOOKUP.onnx PRE.onnx STEP.onnx   < decisions   the three extracted decisions
//
// Each input line is one step's inputs, 32 numbers: the step vector (10 features), the
// pre-draft vector (8), the costs of a step verifying each option (chains of γ = 1..8, then
// the 5 trees of speckv.trees) and the cost of a plain step; 27 for a file that lists no
// trees (it chooses among chains only). Where the context lookup proposes tokens, 5 more:
// its 4 signals (the lookup vector's first entries; the pre-draft vector completes it) and
// the cost of a step verifying its continuation. Each output line is
// {"lookup": true|false, "speculate": true|false, "gamma": option} (γ for a chain, 9 + i for
// tree i; "lookup" only where the lookup proposes). A decoder asks for the lookup first,
// where it proposes, then for speculate before its draft runs, and for γ only when it drafts
// (docs/EMBEDDING.md, sections 2 and 7); this program asks for each on every line. Build it
// with examples/cpp/build.sh.
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

// The contract (speckv/runtime/contract.py): the format this program reads, and the vectors
// it builds, in input order. A file that lists other ones was trained for other inputs.
constexpr int kFormatVersion = 4;
const std::vector<std::string> kFeatureNames = {
    "draft_entropy", "draft_top1", "draft_margin", "target_top1_prev", "agree_ema",
    "agree_run", "log_position", "compression_fp16", "compression_int8", "compression_nf4"};
const std::vector<std::string> kPreFeatureNames = {
    "target_top1_prev", "agree_ema", "agree_run", "unsettled", "log_position",
    "compression_fp16", "compression_int8", "compression_nf4"};
// the lookup vector: the context lookup's 4 signals, then the pre-draft vector
const std::vector<std::string> kLookupFeatureNames = {
    "lookup_length", "lookup_match", "lookup_log_occurrences", "lookup_agreeing",
    "target_top1_prev", "agree_ema", "agree_run", "unsettled", "log_position",
    "compression_fp16", "compression_int8", "compression_nf4"};
const std::vector<std::string> kGammas = {"1", "2", "3", "4", "5", "6", "7", "8"};
// speckv.trees, [size, depth, branch] each, flattened: the trees whose costs a caller passes
const std::vector<std::string> kTrees = {"4", "2", "4", "8",  "3", "4", "16", "4",
                                         "4", "32", "5", "4", "64", "6", "4"};
constexpr int64_t N = 10, M = 8, G = 8 + 5;  // G: the most options, chains then trees
constexpr int64_t S = 4, L = S + M;           // the lookup's signals; its whole vector

// The buffers bound to the sessions once and refilled for every decision.
struct Buffers {
  std::array<float, N> features{};
  std::array<float, M> pre_features{};
  std::array<float, G> costs{};
  std::array<float, 1> plain_cost{};
  std::array<float, L> lookup_features{};
  std::array<float, 1> lookup_cost{};
  std::array<int64_t, 1> lookup{}, speculate{}, gamma{};
  int64_t options = G;     // the file's: 8 chains, and its 5 trees unless it lists none
  int lookup_max = 0;      // the file's speckv.lookup_max_tokens: the longest continuation
  bool proposes = false;   // whether this line holds a lookup proposal
};

std::string metadata(const Ort::Session& session, const char* key) {
  Ort::AllocatorWithDefaultOptions alloc;
  auto value = session.GetModelMetadata().LookupCustomMetadataMapAllocated(key, alloc);
  return value ? std::string(value.get()) : std::string();
}

// The items of a JSON list of plain names or integers, as speckv writes them.
std::vector<std::string> json_list(const std::string& text) {
  std::vector<std::string> items;
  std::string item;
  bool quoted = false;
  for (char c : text) {
    if (c == '"') quoted = !quoted;
    else if (quoted || (c != '[' && c != ']' && c != ',' && c != ' ')) item += c;
    else if ((c == ',' || c == ']') && !item.empty()) items.push_back(item), item.clear();
  }
  return items;
}

// Refuse a file that is not speckv's format 4 for these vectors, saying what to do; note in
// `b` how many options it chooses among and the longest continuation it prices.
void check_contract(const Ort::Session& session, const std::string& path, Buffers& b) {
  const std::string version = metadata(session, "speckv.format_version");
  if (version.empty())
    throw std::runtime_error(path + " is not a speckv controller (no speckv.format_version "
                             "metadata): export one with `python -m speckv export`.");
  if (version != std::to_string(kFormatVersion)) {
    const bool older = std::atoi(version.c_str()) < kFormatVersion;
    throw std::runtime_error(
        path + " uses controller format " + version + "; this program reads format " +
        std::to_string(kFormatVersion) + ": " +
        (older ? "retrain and re-export it (`python -m speckv.train fit`, then `python -m "
                 "speckv export`)."
               : "update this program to the new format (docs/EMBEDDING.md), or export the "
                 "controller with a speckv that writes format " +
                     std::to_string(kFormatVersion) + "."));
  }
  if (metadata(session, "speckv.inputs") != "features")
    throw std::runtime_error(path + " takes '" + metadata(session, "speckv.inputs") +
                             "' as input; this program feeds 'features' vectors.");
  const struct { const char* key; const std::vector<std::string>& expected; } lists[] = {
      {"speckv.feature_names", kFeatureNames},
      {"speckv.pre_feature_names", kPreFeatureNames},
      {"speckv.lookup_feature_names", kLookupFeatureNames},
      {"speckv.gammas", kGammas},
      {"speckv.trees", kTrees}};
  for (const auto& list : lists) {
    const std::string found = metadata(session, list.key);
    const bool no_trees = list.expected == kTrees && json_list(found).empty();
    if (json_list(found) != list.expected && !no_trees)
      throw std::runtime_error(path + ": " + list.key + " is " + found +
                               ", not what this program builds; retrain and re-export the "
                               "controller for these inputs, or change the program.");
  }
  b.options = json_list(metadata(session, "speckv.trees")).empty() ? 8 : G;
  b.lookup_max = std::atoi(metadata(session, "speckv.lookup_max_tokens").c_str());
  if (b.lookup_max < 1)
    throw std::runtime_error(path + ": speckv.lookup_max_tokens is '" +
                             metadata(session, "speckv.lookup_max_tokens") +
                             "', not a count of tokens; re-export the controller.");
}

template <typename T, size_t K>
Ort::Value tensor(const Ort::MemoryInfo& mem, std::array<T, K>& buffer,
                  std::vector<int64_t> shape) {
  return Ort::Value::CreateTensor<T>(mem, buffer.data(), K, shape.data(), shape.size());
}

// Bind every input the session has, and the decisions among its outputs, to the buffers.
Ort::IoBinding bind(Ort::Session& session, Buffers& b, const Ort::MemoryInfo& mem) {
  Ort::IoBinding io(session);
  Ort::AllocatorWithDefaultOptions alloc;
  for (size_t i = 0; i < session.GetInputCount(); ++i) {
    const std::string name = session.GetInputNameAllocated(i, alloc).get();
    if (name == "features") io.BindInput(name.c_str(), tensor(mem, b.features, {1, N}));
    else if (name == "pre_features")
      io.BindInput(name.c_str(), tensor(mem, b.pre_features, {1, M}));
    else if (name == "costs")
      io.BindInput(name.c_str(), Ort::Value::CreateTensor<float>(
                                     mem, b.costs.data(), b.options,
                                     std::vector<int64_t>{1, b.options}.data(), 2));
    else if (name == "plain_cost") io.BindInput(name.c_str(), tensor(mem, b.plain_cost, {1, 1}));
    else if (name == "lookup_features")
      io.BindInput(name.c_str(), tensor(mem, b.lookup_features, {1, L}));
    else if (name == "lookup_cost")
      io.BindInput(name.c_str(), tensor(mem, b.lookup_cost, {1, 1}));
    else throw std::runtime_error("unexpected input " + name + ": re-export the controller.");
  }
  for (size_t i = 0; i < session.GetOutputCount(); ++i) {
    const std::string name = session.GetOutputNameAllocated(i, alloc).get();
    if (name == "lookup") io.BindOutput("lookup", tensor(mem, b.lookup, {1}));
    else if (name == "speculate") io.BindOutput("speculate", tensor(mem, b.speculate, {1}));
    else if (name == "gamma") io.BindOutput("gamma", tensor(mem, b.gamma, {1}));
  }
  return io;
}

// Whether the session gives the lookup decision alone (the extracted lookup head): it runs
// only on a line where the lookup proposes, the only time its inputs are known.
bool lookup_only(const Ort::Session& session) {
  Ort::AllocatorWithDefaultOptions alloc;
  for (size_t i = 0; i < session.GetOutputCount(); ++i) {
    const std::string name = session.GetOutputNameAllocated(i, alloc).get();
    if (name == "speculate" || name == "gamma") return false;
  }
  return true;
}

// Parse one line into the buffers; the graph assumes finite features and positive costs.
void fill(const std::string& line, Buffers& b) {
  std::istringstream in(line);
  std::vector<float> v;
  for (float x; in >> x;) v.push_back(x);
  const int64_t g = b.options, n = N + M + g + 1;
  const auto count = static_cast<int64_t>(v.size());
  if (!in.eof() || (count != n && count != n + S + 1))
    throw std::runtime_error("expected " + std::to_string(n) + " numbers (10 features, 8 "
                             "pre-draft features, " + std::to_string(g) + " option costs, the "
                             "plain cost), or " + std::to_string(n + S + 1) + " where the "
                             "lookup proposes (then its 4 signals and its cost), got: " + line);
  const float* x = v.data();
  std::copy(x, x + N, b.features.begin());
  std::copy(x + N, x + N + M, b.pre_features.begin());
  std::copy(x + N + M, x + N + M + g, b.costs.begin());
  b.plain_cost[0] = x[N + M + g];
  // the lookup vector: its signals, then the pre-draft vector; without a proposal the
  // whole file still computes the lookup head, on placeholder values, and it is not read
  b.proposes = count > n;
  if (b.proposes) std::copy(x + n, x + n + S, b.lookup_features.begin());
  else std::fill_n(b.lookup_features.begin(), S, 0.0f);
  std::copy(b.pre_features.begin(), b.pre_features.end(), b.lookup_features.begin() + S);
  b.lookup_cost[0] = b.proposes ? x[n + S] : 1.0f;
  for (float value : v)
    if (!std::isfinite(value)) throw std::runtime_error("a number is not finite: " + line);
  for (int64_t i = 0; i < g; ++i)
    if (!(b.costs[i] > 0)) throw std::runtime_error("costs must be > 0: " + line);
  if (!(b.plain_cost[0] > 0)) throw std::runtime_error("the plain cost must be > 0: " + line);
  if (!b.proposes) return;
  const float length = b.lookup_features[0];
  if (!(length >= 1 && length <= b.lookup_max && length == std::floor(length)))
    throw std::runtime_error("the lookup's length must be a whole number of tokens, 1 to " +
                             std::to_string(b.lookup_max) + ": " + line);
  if (!(b.lookup_cost[0] > 0)) throw std::runtime_error("the lookup cost must be > 0: " + line);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || argc > 4) {
    std::cerr << "usage: " << argv[0] << " CONTROLLER.onnx < decisions\n"
              << "       " << argv[0] << " LOOKUP.onnx PRE.onnx STEP.onnx < decisions\n";
    return 2;
  }
  try {
    Ort::Env env(ORT_LOGGING_LEVEL_ERROR, "speckv");
    Ort::SessionOptions opts;  // speckv.runtime.session_options(): one thread, sequential
    opts.SetIntraOpNumThreads(1);
    opts.SetInterOpNumThreads(1);
    opts.SetExecutionMode(ExecutionMode::ORT_SEQUENTIAL);
    opts.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
    std::vector<Ort::Session> sessions;
    Buffers b;
    for (int i = 1; i < argc; ++i) {
      sessions.emplace_back(env, argv[i], opts);  // a wchar_t* path on Windows
      check_contract(sessions.back(), argv[i], b);
    }
    std::cerr << "ONNX Runtime " << Ort::GetVersionString() << ", speckv controller format "
              << kFormatVersion << " (speckv " << metadata(sessions[0], "speckv.version")
              << "), max_skip_run " << metadata(sessions[0], "speckv.max_skip_run")
              << ", lookup_max_tokens " << b.lookup_max << "\n";

    const auto mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    std::vector<Ort::IoBinding> bindings;
    std::vector<bool> only_where_proposed;
    for (auto& session : sessions) {
      bindings.push_back(bind(session, b, mem));
      only_where_proposed.push_back(lookup_only(session));
    }

    for (std::string line; std::getline(std::cin, line);) {
      if (line.find_first_not_of(" \t\r") == std::string::npos || line[0] == '#') continue;
      fill(line, b);
      b.lookup[0] = b.speculate[0] = b.gamma[0] = -1;
      for (size_t i = 0; i < sessions.size(); ++i)
        if (b.proposes || !only_where_proposed[i])
          sessions[i].Run(Ort::RunOptions{nullptr}, bindings[i]);
      if (b.speculate[0] < 0 || b.gamma[0] < 0)
        throw std::runtime_error("the files gave no speculate or no gamma output");
      if (b.proposes && b.lookup[0] < 0)
        throw std::runtime_error("the line has a lookup proposal, but the files gave no "
                                 "lookup output: pass the extracted lookup decision too");
      std::cout << "{";
      if (b.proposes) std::cout << "\"lookup\": " << (b.lookup[0] ? "true" : "false") << ", ";
      std::cout << "\"speculate\": " << (b.speculate[0] ? "true" : "false")
                << ", \"gamma\": " << b.gamma[0] << "}" << std::endl;
    }
  } catch (const std::exception& e) {  // Ort::Exception included
    std::cerr << "choose_gamma: " << e.what() << "\n";
    return 1;
  }
  return 0;
}

// Token sources: counter-based hashing instead of a stateful generator, so that any rank can
// produce any sample directly and a sample never depends on which samples were drawn before it.
#include "engine/exec/token_data.hpp"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <fstream>
#include <system_error>
#include <utility>

#include <fmt/format.h>

#include "engine/core/error.hpp"
#include "engine/core/hash.hpp"

namespace px {
namespace {

std::uint64_t mix(std::uint64_t x) { return splitmix64(x); }

// Chained rather than xor-ed together, so that (a, b) and (b, a) hash differently.
std::uint64_t hash(std::uint64_t a, std::uint64_t b, std::uint64_t c, std::uint64_t d = 0) {
  return mix(mix(mix(mix(a) ^ b) ^ c) ^ d);
}

// Domain tags keep the streams for different purposes independent under one seed.
constexpr std::uint64_t kTableTag = 0x7461626c65ULL;  // "table"
constexpr std::uint64_t kTrainTag = 0x747261696eULL;  // "train"

std::uint64_t u64(std::int64_t v) { return static_cast<std::uint64_t>(v); }

// Modulo bias is below n / 2^64, far under anything a loss curve could show.
std::int64_t below(std::uint64_t h, std::int64_t n) { return static_cast<std::int64_t>(h % u64(n)); }

double unit(std::uint64_t h) { return static_cast<double>(h >> 11) * 0x1.0p-53; }

Error spec_error(std::string message, std::string hint = {}) {
  return Error(ErrorKind::Spec, Location{}, std::move(message), std::move(hint));
}

}  // namespace

SyntheticTokens::SyntheticTokens(int vocab, std::uint64_t seed, int branching, double noise)
    : vocab_(vocab), seed_(seed), branching_(branching), noise_(noise) {
  if (vocab < 1) throw spec_error(fmt::format("synthetic tokens: vocab_size must be at least 1, got {}", vocab));
  if (branching < 1 || branching > vocab)
    throw spec_error(fmt::format("synthetic tokens: branching must be in [1, {}], got {}", vocab, branching));
  if (!(noise >= 0.0 && noise <= 1.0))
    throw spec_error(fmt::format("synthetic tokens: noise must be in [0, 1], got {}", noise));

  // Floyd's algorithm: `branching` distinct successors in O(branching) draws, whatever the vocab.
  successors_.reserve(static_cast<std::size_t>(vocab) * static_cast<std::size_t>(branching));
  for (std::int32_t s = 0; s < vocab; ++s) {
    const std::size_t row = successors_.size();
    for (std::int32_t j = vocab - branching; j < vocab; ++j) {
      auto t = static_cast<std::int32_t>(below(hash(seed, kTableTag, u64(s), u64(j)), j + 1));
      if (std::find(successors_.begin() + row, successors_.end(), t) != successors_.end()) t = j;
      successors_.push_back(t);
    }
  }
}

void SyntheticTokens::sample(std::int64_t iteration, std::int64_t index, std::span<std::int32_t> tokens,
                             std::span<std::int32_t> targets) const {
  assert(tokens.size() == targets.size());
  const std::size_t n = tokens.size();
  if (n == 0) return;
  auto step = [&](std::size_t position) { return hash(seed_, u64(iteration), u64(index), position); };

  std::int32_t current = static_cast<std::int32_t>(below(step(0), vocab_));
  for (std::size_t i = 0; i < n; ++i) {
    tokens[i] = current;
    const std::uint64_t h = step(i + 1);
    const std::uint64_t pick = mix(h);
    if (unit(h) < noise_) {
      current = static_cast<std::int32_t>(below(pick, vocab_));
    } else {
      current = successors_[static_cast<std::size_t>(current) * static_cast<std::size_t>(branching_) +
                            static_cast<std::size_t>(below(pick, branching_))];
    }
    targets[i] = current;
  }
}

double SyntheticTokens::entropy_floor() const {
  // The successors carry (1 - noise) / branching each on top of the noise's uniform share.
  const double v = vocab_, k = branching_;
  const double rest = noise_ / v, chosen = (1.0 - noise_) / k + rest;
  auto term = [](double p) { return p > 0.0 ? -p * std::log(p) : 0.0; };
  return k * term(chosen) + (v - k) * term(rest);
}

std::span<const std::int32_t> SyntheticTokens::successors(std::int32_t token) const {
  assert(token >= 0 && token < vocab_);
  return std::span(successors_).subspan(static_cast<std::size_t>(token) * static_cast<std::size_t>(branching_),
                                        static_cast<std::size_t>(branching_));
}

ByteCorpus::ByteCorpus(const std::filesystem::path& file, ByteCorpusOptions options)
    : path_(file), options_(options) {
  const Location where{file.string()};
  std::error_code ec;
  // An ifstream "opens" a directory on Linux and only fails on read; say what is wrong instead.
  if (!std::filesystem::is_regular_file(file, ec))
    throw Error(ErrorKind::Io, where, std::filesystem::exists(file, ec) ? "not a regular file" : "no such file",
                "pass a text file, e.g. datasets/corpus/kjv.txt");
  const auto bytes = std::filesystem::file_size(file, ec);
  std::ifstream in(file, std::ios::binary);
  if (!ec && in) {
    bytes_.resize(bytes);
    in.read(bytes_.data(), static_cast<std::streamsize>(bytes));
  }
  if (ec || !in) throw Error(ErrorKind::Io, where, "cannot read the corpus file", "check its permissions");

  if (options.seq_length < 1)
    throw Error(ErrorKind::Spec, where, fmt::format("seq_length must be at least 1, got {}", options.seq_length));
  if (!(options.holdout_fraction >= 0.0 && options.holdout_fraction < 1.0))
    throw Error(ErrorKind::Spec, where,
                fmt::format("holdout_fraction must be in [0, 1), got {}", options.holdout_fraction));
  const std::int64_t window = options.seq_length + 1;
  if (size() < window)
    throw Error(ErrorKind::Spec, where,
                fmt::format("the corpus has {} bytes, shorter than one sequence of {} tokens plus its last target",
                            size(), options.seq_length),
                "use a longer file or a shorter seq_length");

  const auto heldout = static_cast<std::int64_t>(static_cast<double>(size()) * options.holdout_fraction);
  train_bytes_ = size() - heldout;
  if (train_bytes_ < window || (heldout > 0 && heldout < window))
    throw Error(ErrorKind::Spec, where,
                fmt::format("holdout_fraction {} splits {} bytes into {} for training and {} held out; each part "
                            "needs at least {} bytes",
                            options.holdout_fraction, size(), train_bytes_, heldout, window),
                "change holdout_fraction or shorten seq_length");
}

void ByteCorpus::check_length(std::int64_t length, std::int64_t region, const char* what) const {
  if (length + 1 > region)
    throw Error(ErrorKind::Spec, Location{path_.string()},
                fmt::format("a window of {} tokens needs {} bytes; the {} has {}", length, length + 1, what, region),
                region == 0 ? "set ByteCorpusOptions::holdout_fraction to keep a held-out tail" : "");
}

std::int64_t ByteCorpus::offset(std::int64_t iteration, std::int64_t index, std::int64_t length) const {
  check_length(length, train_bytes_, "training part");
  return below(hash(options_.seed, kTrainTag, u64(iteration), u64(index)), train_bytes_ - length);
}

void ByteCorpus::sample(std::int64_t iteration, std::int64_t index, std::span<std::int32_t> tokens,
                        std::span<std::int32_t> targets) const {
  window(offset(iteration, index, static_cast<std::int64_t>(tokens.size())), tokens, targets);
}

std::int64_t ByteCorpus::eval_windows(std::int64_t length) const {
  if (length < 1 || heldout_bytes() < length + 1) return 0;
  return (heldout_bytes() - 1) / length;  // consecutive windows share one byte: a target, then a token
}

std::int64_t ByteCorpus::eval_offset(std::int64_t index, std::int64_t length) const {
  check_length(length, heldout_bytes(), "held-out tail");
  const std::int64_t count = eval_windows(length);
  const std::int64_t k = ((index % count) + count) % count;
  return train_bytes_ + k * length;
}

void ByteCorpus::sample_eval(std::int64_t index, std::span<std::int32_t> tokens,
                             std::span<std::int32_t> targets) const {
  window(eval_offset(index, static_cast<std::int64_t>(tokens.size())), tokens, targets);
}

void ByteCorpus::window(std::int64_t offset, std::span<std::int32_t> tokens, std::span<std::int32_t> targets) const {
  assert(tokens.size() == targets.size());
  assert(offset >= 0 && offset + static_cast<std::int64_t>(tokens.size()) < size());
  const auto* p = reinterpret_cast<const unsigned char*>(bytes_.data()) + offset;
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    tokens[i] = p[i];
    targets[i] = p[i + 1];
  }
}

std::filesystem::path default_corpus_path(const std::filesystem::path& datasets_dir) {
  return datasets_dir / "corpus" / "kjv.txt";
}

}  // namespace px

// Training data for the engine: sources of token sequences that any rank can fetch by
// (iteration, sample index) alone, so data-parallel ranks read their own samples with no
// coordination and a rerun sees exactly the same data.
#pragma once

#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

namespace px {

class TokenSource {
 public:
  virtual ~TokenSource() = default;

  // Fills one training sequence: targets[i] is the token that follows tokens[i]. `index` is the
  // sample's position in the iteration's global batch. A pure function of its arguments: the same
  // (iteration, index) gives the same sequence in every process. tokens and targets have equal size.
  virtual void sample(std::int64_t iteration, std::int64_t index, std::span<std::int32_t> tokens,
                      std::span<std::int32_t> targets) const = 0;
  virtual int vocab_size() const = 0;
};

// A fixed random first-order Markov chain: each token has `branching` distinct successors drawn
// from the seed; a step goes to one of them uniformly, except that with probability `noise` it goes
// to a uniformly random token instead. The first token of a sequence is uniform. Every step's
// randomness is a hash of (seed, iteration, index, position), so sequences need no stored state.
// A model that learns the bigram table reaches entropy_floor() nats per target, well under
// ln(vocab); no model can go lower, since every row of the chain has this same entropy.
class SyntheticTokens final : public TokenSource {
 public:
  SyntheticTokens(int vocab, std::uint64_t seed, int branching = 4, double noise = 0.1);

  void sample(std::int64_t iteration, std::int64_t index, std::span<std::int32_t> tokens,
              std::span<std::int32_t> targets) const override;
  int vocab_size() const override { return vocab_; }

  // Conditional entropy of a target given the token before it, in nats.
  double entropy_floor() const;
  // The successors of `token`, for tests and for checking what a model learnt.
  std::span<const std::int32_t> successors(std::int32_t token) const;

 private:
  int vocab_;
  std::uint64_t seed_;
  int branching_;
  double noise_;
  std::vector<std::int32_t> successors_;  // vocab_ × branching_
};

struct ByteCorpusOptions {
  std::int64_t seq_length = 0;   // the longest sequence sample() will be asked for
  std::uint64_t seed = 0;        // picks the training windows
  double holdout_fraction = 0.0; // the file's last fraction, in [0, 1), is kept for sample_eval()
};

// A text file read as bytes (vocabulary 256). Training windows start at pseudo-random offsets in
// the file's head; evaluation windows tile its held-out tail, so training never sees a held-out byte.
// Throws px::Error: Io (naming the file) when it can't be read, Spec when the file, or its training
// part or held-out tail, is shorter than seq_length + 1 bytes.
class ByteCorpus final : public TokenSource {
 public:
  ByteCorpus(const std::filesystem::path& file, ByteCorpusOptions options);

  // Window of tokens.size() + 1 bytes at offset(iteration, index, tokens.size()).
  void sample(std::int64_t iteration, std::int64_t index, std::span<std::int32_t> tokens,
              std::span<std::int32_t> targets) const override;
  int vocab_size() const override { return 256; }

  // Held-out window `index` (taken modulo eval_windows(length)). Indices 0 .. eval_windows - 1
  // cover the tail once without overlap, so an evaluation over them has no sampling noise.
  void sample_eval(std::int64_t index, std::span<std::int32_t> tokens,
                   std::span<std::int32_t> targets) const;
  std::int64_t eval_windows(std::int64_t length) const;

  // Where the windows start, so a trace can say which bytes a step trained on.
  std::int64_t offset(std::int64_t iteration, std::int64_t index, std::int64_t length) const;
  std::int64_t eval_offset(std::int64_t index, std::int64_t length) const;
  // The window of tokens.size() + 1 bytes at `offset`; offset + tokens.size() < size().
  void window(std::int64_t offset, std::span<std::int32_t> tokens, std::span<std::int32_t> targets) const;

  std::int64_t size() const { return static_cast<std::int64_t>(bytes_.size()); }
  std::int64_t train_bytes() const { return train_bytes_; }  // [0, train_bytes) trains
  std::int64_t heldout_bytes() const { return size() - train_bytes_; }
  const std::filesystem::path& path() const { return path_; }

 private:
  void check_length(std::int64_t length, std::int64_t region, const char* what) const;

  std::filesystem::path path_;
  ByteCorpusOptions options_;
  std::string bytes_;
  std::int64_t train_bytes_ = 0;
};

// The corpus shipped with Parallax: datasets/corpus/kjv.txt (see datasets/corpus/README.md).
std::filesystem::path default_corpus_path(const std::filesystem::path& datasets_dir);

}  // namespace px

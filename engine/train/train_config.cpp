// The training data a run's configuration names.
#include "engine/train/train_config.hpp"

namespace px {

std::unique_ptr<TokenSource> make_token_source(const TrainConfig& c) {
  if (c.data == "synthetic") return std::make_unique<SyntheticTokens>(c.model.vocab_size, c.options.seed);
  const std::filesystem::path file = c.data == "corpus" ? default_corpus_path(c.datasets_dir) : std::filesystem::path(c.data);
  ByteCorpusOptions o;
  o.seq_length = c.plan.seq_length;
  o.seed = c.options.seed;
  return std::make_unique<ByteCorpus>(file, o);
}

}  // namespace px

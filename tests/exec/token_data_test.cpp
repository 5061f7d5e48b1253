// Token sources: samples are pure functions of (iteration, index), targets are the next tokens,
// the synthetic chain is as learnable as documented, and the shipped corpus reads back byte-exact.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "engine/core/error.hpp"
#include "engine/exec/token_data.hpp"

namespace px {
namespace {

using Seq = std::vector<std::int32_t>;

struct Sample {
  Seq tokens, targets;
  bool operator==(const Sample&) const = default;
};

Sample draw(const TokenSource& source, std::int64_t iteration, std::int64_t index, std::size_t n) {
  Sample s{Seq(n), Seq(n)};
  source.sample(iteration, index, s.tokens, s.targets);
  return s;
}

std::string read_all(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::filesystem::path corpus() { return default_corpus_path(PX_DATASETS_DIR); }

std::filesystem::path write_temp(const std::string& name, const std::string& text) {
  const auto path = std::filesystem::path(::testing::TempDir()) / name;
  std::ofstream(path, std::ios::binary) << text;
  return path;
}

// Expects `fn` to throw px::Error of `kind` whose message names `path`.
template <class Fn>
void expect_error(ErrorKind kind, const std::filesystem::path& path, Fn fn) {
  try {
    fn();
    ADD_FAILURE() << "no error thrown";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), kind) << e.what();
    EXPECT_EQ(e.where().file, path.string());
    EXPECT_NE(std::string(e.what()).find(path.string()), std::string::npos) << e.what();
  }
}

void expect_shifted(const Sample& s) {
  for (std::size_t i = 0; i + 1 < s.tokens.size(); ++i) ASSERT_EQ(s.targets[i], s.tokens[i + 1]) << "at " << i;
}

TEST(SyntheticTokens, SameInputsSameSequenceInAnyInstance) {
  const SyntheticTokens a(64, 7), b(64, 7);  // b stands for another rank
  EXPECT_EQ(draw(a, 3, 5, 128), draw(a, 3, 5, 128));
  EXPECT_EQ(draw(a, 3, 5, 128), draw(b, 3, 5, 128));
  EXPECT_NE(draw(a, 3, 5, 128), draw(a, 3, 6, 128));
  EXPECT_NE(draw(a, 3, 5, 128), draw(a, 4, 5, 128));
  EXPECT_NE(draw(a, 3, 5, 128), draw(SyntheticTokens(64, 8), 3, 5, 128));
}

TEST(SyntheticTokens, TargetsAreTheNextTokensAndShorterSamplesArePrefixes) {
  const SyntheticTokens source(50, 1);
  const Sample long_one = draw(source, 0, 9, 200), short_one = draw(source, 0, 9, 20);
  expect_shifted(long_one);
  EXPECT_TRUE(std::equal(short_one.tokens.begin(), short_one.tokens.end(), long_one.tokens.begin()));
  EXPECT_TRUE(std::equal(short_one.targets.begin(), short_one.targets.end(), long_one.targets.begin()));
}

TEST(SyntheticTokens, TokensStayWithinTheVocabulary) {
  for (int vocab : {1, 2, 7, 256}) {
    const SyntheticTokens source(vocab, 3, std::min(vocab, 4));
    EXPECT_EQ(source.vocab_size(), vocab);
    for (std::int64_t index = 0; index < 20; ++index) {
      const Sample s = draw(source, 1, index, 64);
      for (std::size_t i = 0; i < s.tokens.size(); ++i) {
        ASSERT_GE(s.tokens[i], 0);
        ASSERT_LT(s.tokens[i], vocab);
        ASSERT_GE(s.targets[i], 0);
        ASSERT_LT(s.targets[i], vocab);
      }
    }
  }
}

TEST(SyntheticTokens, SuccessorsAreDistinct) {
  const SyntheticTokens source(10, 5, 10);  // every token a successor: the hardest case for the draw
  for (std::int32_t t = 0; t < 10; ++t) {
    Seq row(source.successors(t).begin(), source.successors(t).end());
    std::sort(row.begin(), row.end());
    EXPECT_EQ(std::adjacent_find(row.begin(), row.end()), row.end());
  }
}

TEST(SyntheticTokens, EntropyFloorMatchesTheClosedFormLimits) {
  EXPECT_NEAR(SyntheticTokens(256, 0, 4, 0.0).entropy_floor(), std::log(4.0), 1e-12);
  EXPECT_NEAR(SyntheticTokens(256, 0, 4, 1.0).entropy_floor(), std::log(256.0), 1e-12);
  EXPECT_LT(SyntheticTokens(256, 0).entropy_floor(), 0.5 * std::log(256.0));  // learnable by default
}

// The empirical bigram entropy of many samples is the documented floor: the chain is what it says.
TEST(SyntheticTokens, EmpiricalBigramEntropyIsTheFloor) {
  constexpr int kVocab = 16;
  const SyntheticTokens source(kVocab, 11, 3, 0.2);
  std::vector<double> counts(kVocab * kVocab, 0.0);
  for (std::int64_t index = 0; index < 1000; ++index) {
    const Sample s = draw(source, 2, index, 256);
    for (std::size_t i = 0; i < s.tokens.size(); ++i) counts[s.tokens[i] * kVocab + s.targets[i]] += 1;
  }
  double total = 0, entropy = 0;
  for (int a = 0; a < kVocab; ++a) {
    double row = 0;
    for (int b = 0; b < kVocab; ++b) row += counts[a * kVocab + b];
    for (int b = 0; b < kVocab; ++b)
      if (const double c = counts[a * kVocab + b]; c > 0) entropy -= c * std::log(c / row);
    total += row;
  }
  EXPECT_NEAR(entropy / total, source.entropy_floor(), 0.01);
}

TEST(SyntheticTokens, RejectsImpossibleParameters) {
  for (auto make : {+[] { SyntheticTokens(0, 1); }, +[] { SyntheticTokens(8, 1, 9); },
                    +[] { SyntheticTokens(8, 1, 0); }, +[] { SyntheticTokens(8, 1, 2, 1.5); }}) {
    try {
      make();
      ADD_FAILURE() << "no error thrown";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::Spec);
    }
  }
}

TEST(ByteCorpus, ShippedCorpusLoadsAndRoundTrips) {
  ASSERT_TRUE(std::filesystem::is_regular_file(corpus())) << corpus();
  const std::string text = read_all(corpus());
  const ByteCorpus data(corpus(), {.seq_length = 64});
  EXPECT_EQ(data.vocab_size(), 256);
  EXPECT_EQ(data.size(), 1'499'835);  // datasets/corpus/README.md
  EXPECT_EQ(data.size(), static_cast<std::int64_t>(text.size()));
  EXPECT_EQ(text.rfind("In the beginning God created the heaven and the earth.\n", 0), 0u);

  for (std::int64_t offset : {std::int64_t{0}, std::int64_t{12'345}, data.size() - 65}) {
    Sample s{Seq(64), Seq(64)};
    data.window(offset, s.tokens, s.targets);
    expect_shifted(s);
    for (std::size_t i = 0; i < 64; ++i) {
      ASSERT_EQ(s.tokens[i], static_cast<unsigned char>(text[offset + i]));
      ASSERT_EQ(s.targets[i], static_cast<unsigned char>(text[offset + i + 1]));
    }
  }
}

TEST(ByteCorpus, SamplesAreDeterministicWindowsOfTheFile) {
  const std::string text = read_all(corpus());
  const ByteCorpus a(corpus(), {.seq_length = 32, .seed = 4}), b(corpus(), {.seq_length = 32, .seed = 4});
  EXPECT_EQ(draw(a, 7, 2, 32), draw(b, 7, 2, 32));
  EXPECT_NE(draw(a, 7, 2, 32), draw(a, 7, 3, 32));
  EXPECT_NE(draw(a, 7, 2, 32), draw(a, 8, 2, 32));
  EXPECT_NE(a.offset(7, 2, 32), ByteCorpus(corpus(), {.seq_length = 32, .seed = 5}).offset(7, 2, 32));

  const Sample s = draw(a, 7, 2, 32);
  const std::int64_t at = a.offset(7, 2, 32);
  expect_shifted(s);
  for (std::size_t i = 0; i < 32; ++i) {
    ASSERT_EQ(s.tokens[i], static_cast<unsigned char>(text[at + i]));
    ASSERT_EQ(s.targets[i], static_cast<unsigned char>(text[at + i + 1]));
  }
}

TEST(ByteCorpus, TrainingAndHeldOutWindowsDoNotOverlap) {
  constexpr std::int64_t n = 128;
  const ByteCorpus data(corpus(), {.seq_length = n, .seed = 1, .holdout_fraction = 0.1});
  EXPECT_EQ(data.heldout_bytes(), static_cast<std::int64_t>(static_cast<double>(data.size()) * 0.1));
  EXPECT_EQ(data.train_bytes() + data.heldout_bytes(), data.size());

  for (std::int64_t iteration = 0; iteration < 50; ++iteration)
    for (std::int64_t index = 0; index < 64; ++index) {
      const std::int64_t at = data.offset(iteration, index, n);
      ASSERT_GE(at, 0);
      ASSERT_LT(at + n, data.train_bytes());  // the last target byte too
    }

  const std::int64_t count = data.eval_windows(n);
  ASSERT_GT(count, 0);
  for (std::int64_t k = 0; k < count; ++k) {
    const std::int64_t at = data.eval_offset(k, n);
    ASSERT_EQ(at, data.train_bytes() + k * n);  // tiles the tail: each held-out target once
    ASSERT_LT(at + n, data.size());
  }
  EXPECT_EQ(data.eval_offset(count, n), data.eval_offset(0, n));
  EXPECT_EQ(data.eval_offset(-1, n), data.eval_offset(count - 1, n));

  const std::string text = read_all(corpus());
  Sample s{Seq(n), Seq(n)};
  data.sample_eval(3, s.tokens, s.targets);
  EXPECT_EQ(s.tokens[0], static_cast<unsigned char>(text[data.train_bytes() + 3 * n]));
  expect_shifted(s);
}

TEST(ByteCorpus, UnreadableFilesAreIoErrorsNamingThePath) {
  const auto missing = std::filesystem::path(::testing::TempDir()) / "token-data-no-such-file.txt";
  expect_error(ErrorKind::Io, missing, [&] { ByteCorpus(missing, {.seq_length = 8}); });
  const auto dir = std::filesystem::path(::testing::TempDir());
  expect_error(ErrorKind::Io, dir, [&] { ByteCorpus(dir, {.seq_length = 8}); });
}

TEST(ByteCorpus, TooShortFilesAreSpecErrorsNamingThePath) {
  const auto ten = write_temp("token-data-ten-bytes.txt", "0123456789");
  EXPECT_EQ(ByteCorpus(ten, {.seq_length = 9}).size(), 10);  // nine tokens and one more target fit
  expect_error(ErrorKind::Spec, ten, [&] { ByteCorpus(ten, {.seq_length = 10}); });
  const auto empty = write_temp("token-data-empty.txt", "");
  expect_error(ErrorKind::Spec, empty, [&] { ByteCorpus(empty, {.seq_length = 1}); });
  // 10% of 10 bytes holds out one byte, too few for a window.
  expect_error(ErrorKind::Spec, ten, [&] { ByteCorpus(ten, {.seq_length = 4, .holdout_fraction = 0.1}); });
  expect_error(ErrorKind::Spec, ten, [&] { ByteCorpus(ten, {.seq_length = 4, .holdout_fraction = 1.0}); });
  expect_error(ErrorKind::Spec, ten, [&] { ByteCorpus(ten, {.seq_length = 0}); });
}

TEST(ByteCorpus, WindowsLongerThanTheirRegionAreSpecErrors) {
  const auto ten = write_temp("token-data-ten-bytes-2.txt", "0123456789");
  const ByteCorpus data(ten, {.seq_length = 4});
  Sample s{Seq(10), Seq(10)};
  expect_error(ErrorKind::Spec, ten, [&] { data.sample(0, 0, s.tokens, s.targets); });
  Sample small{Seq(4), Seq(4)};
  EXPECT_EQ(data.eval_windows(4), 0);
  expect_error(ErrorKind::Spec, ten, [&] { data.sample_eval(0, small.tokens, small.targets); });
}

}  // namespace
}  // namespace px

// Token and learned-position embeddings, vocabulary-parallel as Megatron shards them: a rank
// holds rows [vocab_begin, vocab_begin + rows) of the word table, looks up the tokens that fall
// there and writes zeros for the rest, so a sum over the tensor-parallel group is the full lookup.
#pragma once

#include <cstdint>
#include <span>

namespace px::cpu {

// out[tokens x h] = word[token - vocab_begin] (zero outside the shard) + pos[position] (when pos
// is not empty).
template <class T>
void embedding_forward(std::span<const std::int32_t> tokens, std::span<const std::int32_t> positions, std::span<const T> word,
                       std::int64_t vocab_begin, std::span<const T> pos, std::span<T> out, std::int64_t h);

// dword[token - vocab_begin] += dy for the tokens of this shard; dpos[position] += dy when dpos
// is not empty.
template <class T>
void embedding_backward(std::span<const T> dy, std::span<const std::int32_t> tokens, std::span<const std::int32_t> positions,
                        std::span<T> dword, std::int64_t vocab_begin, std::span<T> dpos, std::int64_t h);

}  // namespace px::cpu

#include "src/core/block_index.h"

namespace kvtier {

BlockIndex::Entry* BlockIndex::Find(const BlockKey& key) {
  auto it = blocks_.find(key);
  return it == blocks_.end() ? nullptr : &it->second;
}

std::pair<BlockIndex::Entry*, bool> BlockIndex::Insert(const BlockKey& key) {
  auto [it, created] = blocks_.try_emplace(key);
  Entry* e = &it->second;
  if (created) {
    e->key = &it->first;
    Chain& chain = sequences_[SequenceKey{key.namespace_id, key.sequence}];
    e->seq_next = chain.head;
    if (chain.head != nullptr) chain.head->seq_prev = e;
    chain.head = e;
    ++chain.blocks;
  }
  return {e, created};
}

void BlockIndex::Erase(Entry* entry) {
  const BlockKey key = *entry->key;  // a copy: the node holding *entry->key goes away
  auto chain_it = sequences_.find(SequenceKey{key.namespace_id, key.sequence});
  Chain& chain = chain_it->second;
  if (entry->seq_prev != nullptr) {
    entry->seq_prev->seq_next = entry->seq_next;
  } else {
    chain.head = entry->seq_next;
  }
  if (entry->seq_next != nullptr) entry->seq_next->seq_prev = entry->seq_prev;
  if (--chain.blocks == 0) sequences_.erase(chain_it);
  blocks_.erase(key);
}

}  // namespace kvtier

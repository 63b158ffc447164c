"""A radix tree of token ids whose nodes hold the K/V of their tokens: SGLang's RadixAttention prefix cache.

PAPERS
- Zheng et al. 2024, "SGLang: Efficient Execution of Structured Language Model Programs", section 3
  (RadixAttention): the K/V of every request stay in a radix tree after it finishes; a new request walks the
  tree for its longest cached prefix; nodes in use carry a reference count; when memory runs short, the least
  recently used leaves whose count is zero go first.
- Gim et al. 2024, "Prompt Cache": reused attention states must sit at the same positions (here they always
  do: a prefix starts at position 0, so its RoPE-rotated keys are exactly what a recompute would give).

INTUITION
A trie of token sequences where each edge holds a run of tokens (a radix tree: no chain of one-child nodes
for a 1,000-token system prompt, one node). A node's K/V are those of its tokens at the positions they have
below the root, so the K/V of a prefix are the concatenation of the nodes on its path. Two requests that
diverge in the middle of an edge split that node in two: the shared part becomes the parent of both tails.

    root -- "<sys> You are a helpful ... </sys> <user>" --+-- "What is 2+2? <asst> 4"
                                                          +-- "Name a colour. <asst> Blue"

IMPLEMENTATION
- `match(tokens, limit)`: walk from the root while the tokens agree; a match ending inside an edge splits
  that node so the match ends on a node (the handle a request locks). Every node on the path is touched (LRU).
- `insert(tokens, k, v)`: after a request, the part of its tokens the tree lacks becomes one new leaf (a copy of
  those positions of the request's cache); then the tree evicts down to its budget.
- `lock(match)` / `unlock(match)`: reference counts on the path, walked through parent links from the match's
  node, so a split made later by another request (which copies the count to the new parent) is still covered.
  A locked node is never evicted, nor is any node above it (it has a child, and its count is at least as high).
- `evict_to_budget()`: a heap of the evictable leaves (no children, count 0) by last access; pop the oldest,
  drop it; its parent may become an evictable leaf and joins the heap. A parent is touched whenever its child
  is, so it is never older than its children: the tree always sheds its oldest tails first.
WHY a tree and not a hash of blocks (block_hash.py): a match is as long as the shared tokens, to the token, and a
lookup costs one step per node on the path; the price is splitting nodes and a walk instead of one dict lookup.
"""

from __future__ import annotations

import heapq
import itertools

import torch

from course.errors import CourseError
from phase4_advanced_inference.project10_prefix_caching.kv_store import KVSpec, Match, PrefixStore, stack_kv


class Node:
    """An edge of the tree: its tokens, their K/V (layers, kv_heads, len(tokens), head_dim), its children by
    first token, its parent, a reference count and the tick of its last use."""

    __slots__ = ("tokens", "k", "v", "children", "parent", "ref", "last_access")

    def __init__(self, tokens: tuple[int, ...], k, v, parent: "Node | None", now: int = 0):
        self.tokens, self.k, self.v, self.parent = tokens, k, v, parent
        self.children: dict[int, Node] = {}
        self.ref, self.last_access = 0, now

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        return 0 if self.k is None else self.k.nbytes + self.v.nbytes

    def __repr__(self) -> str:
        return f"Node({len(self)} tokens, ref={self.ref}, last={self.last_access}, children={len(self.children)})"


def common_length(a, b) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class RadixCache(PrefixStore):
    """The prefix cache as a radix tree under a byte budget (counters and K/V plumbing: kv_store.PrefixStore)."""

    def __init__(self, spec: KVSpec, budget_bytes: int):
        super().__init__(spec, budget_bytes)
        self.root = Node((), None, None, None)
        self.root.ref = 1  # the root holds no K/V and is never evicted
        self.clock = 0     # a counter, not wall time: LRU order is deterministic (and testable)

    def _tick(self) -> int:
        self.clock += 1
        return self.clock

    # ---- lookup ----------------------------------------------------------------------------------------
    def match(self, tokens: list[int], limit: int | None = None) -> Match:
        """The longest cached prefix of tokens[:limit] (None: all of them). Counts its tokens as hits and the rest
        of `tokens` as misses; touches the path; splits a node where the match ends inside it."""
        n = len(tokens) if limit is None else max(0, min(limit, len(tokens)))
        now, node, pos = self._tick(), self.root, 0
        while pos < n:
            child = node.children.get(tokens[pos])
            if child is None:
                break
            c = common_length(child.tokens, tokens[pos:n])
            if c < len(child):
                child = self._split(child, c)  # the matched part becomes its own node
            child.last_access = now
            node, pos = child, pos + c
        self.count(pos, len(tokens))
        return Match(pos, node)

    def cached_length(self, tokens: list[int]) -> int:
        """How many leading tokens the tree holds: a pure look (no counters, no LRU touch, no split)."""
        node, pos = self.root, 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                break
            c = common_length(child.tokens, tokens[pos:])
            pos += c
            if c < len(child):
                break
            node = child
        return pos

    def chunks(self, match: Match) -> list[Node]:
        """The nodes from the root to the match's node, in order (their K/V concatenated = the prefix's K/V)."""
        path, node = [], match.handle
        while node is not self.root:
            if node is None:  # an evicted node has no parent
                break
            path.append(node)
            node = node.parent
        path.reverse()
        if node is None or sum(len(p) for p in path) != match.length:
            raise CourseError("this match's node is no longer in the tree (evicted while unlocked); lock a match "
                              "before inserting into or evicting from the tree")
        return path

    # ---- insert and split ------------------------------------------------------------------------------
    def insert(self, tokens: list[int], k: list[torch.Tensor], v: list[torch.Tensor]) -> int:
        """Add a request's tokens: k[layer], v[layer] are (kv_heads, >= len(tokens), head_dim), position t holding
        token t (views of the request's cache). What the tree lacks becomes one leaf; returns its token count."""
        n = len(tokens)
        self.check_kv(k, v, n)
        now, node, pos, added = self._tick(), self.root, 0, 0
        while pos < n:
            child = node.children.get(tokens[pos])
            if child is None:  # the rest is new: one leaf holding a copy of positions pos .. n-1
                leaf = Node(tuple(tokens[pos:n]), stack_kv(k, pos, n), stack_kv(v, pos, n), node, now)
                node.children[tokens[pos]] = leaf
                self.nbytes += leaf.nbytes
                added = n - pos
                break
            c = common_length(child.tokens, tokens[pos:n])
            if c < len(child) and pos + c < n:  # they diverge inside this edge: split, the new leaf comes next
                child = self._split(child, c)
            child.last_access = now
            node, pos = child, pos + c
        self.evict_to_budget()
        return added

    def _split(self, node: Node, c: int) -> Node:
        """Cut `node` after its first c tokens (0 < c < len): a new parent holds them, `node` keeps the tail.

        The parent inherits the reference count and last access: every lock and touch through `node` also
        passes through what is now its parent. Bytes are unchanged (both halves are compact copies)."""
        top = Node(node.tokens[:c], node.k[:, :, :c].clone(), node.v[:, :, :c].clone(), node.parent, node.last_access)
        top.ref = node.ref
        node.parent.children[node.tokens[0]] = top
        node.tokens, node.parent = node.tokens[c:], top
        node.k, node.v = node.k[:, :, c:].clone(), node.v[:, :, c:].clone()
        top.children[node.tokens[0]] = node
        return top

    # ---- reference counts --------------------------------------------------------------------------------
    def lock(self, match: Match) -> None:
        """A live request uses this prefix: nothing on its path may be evicted until `unlock`."""
        for node in self.chunks(match):
            node.ref += 1

    def unlock(self, match: Match) -> None:
        path = self.chunks(match)
        if any(node.ref <= 0 for node in path):
            raise CourseError("unlock without a matching lock (a prefix released twice)")
        for node in path:
            node.ref -= 1

    # ---- eviction ----------------------------------------------------------------------------------------
    def evict_to_budget(self) -> list[Node]:
        """Drop least recently used, unreferenced leaves until the bytes held fit the budget (or nothing more may
        go: every remaining node is in use). Returns the evicted nodes, oldest first."""
        if self.nbytes <= self.budget_bytes:
            return []
        order = itertools.count()  # ties broken by insertion order: the heap never compares two nodes
        heap = [(n.last_access, next(order), n) for n in self.nodes() if not n.children and n.ref == 0]
        heapq.heapify(heap)
        evicted = []
        while self.nbytes > self.budget_bytes and heap:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            del parent.children[leaf.tokens[0]]
            self.nbytes -= leaf.nbytes
            self.evictions += 1
            self.evicted_tokens += len(leaf)
            leaf.k = leaf.v = leaf.parent = None  # its bytes go back now, whoever still holds the node object
            evicted.append(leaf)
            if parent is not self.root and not parent.children and parent.ref == 0:
                heapq.heappush(heap, (parent.last_access, next(order), parent))
        return evicted

    # ---- looking at the tree -----------------------------------------------------------------------------
    def nodes(self) -> list[Node]:
        """Every node but the root (depth first)."""
        out, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def __repr__(self) -> str:
        return f"RadixCache({len(self.nodes())} nodes; {self.summary()})"

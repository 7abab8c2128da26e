"""The paged KV layout: every row in its own blocks of ``kv_cache.KvBlocks``, one packed forward
per engine iteration.

Each iteration runs ONE model forward over the packed new tokens of every row:

* one token per decoding row (its last generated token);
* a chunk of prompt tokens per prefilling row within ``max_prefill_tokens`` per iteration: the
  oldest row always gets a share, the others go shortest remaining first (``_share_prefill``). A long prompt is prefilled over several iterations while the running rows keep
  decoding, so a 900-token prompt arriving delays each running stream by one chunk, not by the
  whole prompt. No computation is spent on padding: tokens are packed, and each row's attention
  reads its own keys only (``kv_cache.paged_attention``).

Logits are computed only where a token is due (a decoding row, a row whose prefill finishes) or
where prompt logprobs were asked, by the model's own output head on those positions.

Admission (``fits``) reserves the blocks of the whole prompt, reusing cached prefix blocks of the
same cache key (adapter ref or base); a request that does not fit waits. Decoding takes a block
when a row fills its last one; when the budget is spent, the most recently admitted other row is
*preempted*: its blocks are released and it goes back to the front of the queue, to be prefilled
again (prompt and the tokens it already streamed) and continue where it stopped, emitting nothing
twice. ``Engine`` sizes the budget to hold at least one ``max_context`` sequence, so a row alone
always completes.

Failure isolation: when the packed forward raises, the decoding rows (together) and each prefilling
row (alone) are retried separately, and only the part that still fails is failed. Re-running a
forward rewrites the same slots, so a retry sees a clean cache.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from services.inference.kv_cache import ForwardPlan, KvBlocks, PagedCacheView, Segment
from services.inference.processors import token_logprobs
from services.inference.prompt_adapters import PromptAdapter, compute_prompt_kv
from services.inference.requests import TokenLogprob
from services.inference.sequence import Seq

if TYPE_CHECKING:
    from services.inference.engine import Engine

logger = logging.getLogger(__name__)


class _Chunk:
    """One row's share of an iteration: ``n`` new tokens (1 for a decoding row)."""

    def __init__(self, seq: Seq, n: int, decode: bool) -> None:
        self.seq, self.n, self.decode = seq, n, decode

    @property
    def finishes_prefill(self) -> bool:
        return not self.decode and self.seq.fed + self.n == len(self.seq.feed)


def _share_prefill(ready: list[Seq], budget: int) -> list[tuple[Seq, int]]:
    """This iteration's prompt tokens per prefilling row (``ready`` in admission order).

    The oldest row always gets a quarter of the budget, so no prompt starves; the rest goes to the
    others shortest remaining first, so short prompts (and requests whose prefix was cached) get
    their first token without queueing behind long ones; what is left goes back to the oldest.
    """
    if not ready:
        return []

    def remaining(seq: Seq) -> int:
        return len(seq.feed) - seq.fed

    first = ready[0]
    take = {id(first): min(remaining(first), max(1, budget // 4))}
    left = budget - take[id(first)]
    for seq in sorted(ready[1:], key=remaining):
        if left <= 0:
            break
        take[id(seq)] = min(remaining(seq), left)
        left -= take[id(seq)]
    take[id(first)] += min(remaining(first) - take[id(first)], max(left, 0))
    return [(seq, take[id(seq)]) for seq in ready if take.get(id(seq), 0) > 0]


class PagedBatch:
    """The running rows over a block pool (loop thread only; ``fits``/``remove`` under the engine's
    lock)."""

    paged = True

    def __init__(self, engine: Engine, blocks: KvBlocks) -> None:
        self.engine = engine
        self.blocks = blocks

    # -- admission and accounting ----------------------------------------------------------------

    def fits(self, seq: Seq, admitted: list[Seq]) -> bool:
        """Reserve the blocks of ``seq``'s prompt (reusing cached prefix blocks); False, reserving
        nothing, when the budget cannot hold it now."""
        if not seq.feed:
            seq.feed = list(seq.prompt)
        blocks = self.blocks
        tokens = len(seq.feed) + seq.virtual
        if seq.prompt_hashes is None:  # once per request: fits runs again while it waits
            seq.prompt_hashes = blocks.block_hashes(seq.key, [-1] * seq.virtual + seq.prompt)
        hashes = seq.prompt_hashes  # only prompt blocks are ever registered
        # Prompt logprobs need every prompt position's logits: such a request computes its prompt.
        reuse = seq.prompt_logprobs_k is None
        # At least one token is always computed: its logits give the next token.
        matched = blocks.match(hashes, (tokens - 1) // blocks.block_size) if reuse else []
        need = blocks.blocks_for(tokens) - len(matched)
        if need > blocks.available:
            blocks.release(matched)
            return False
        table = list(matched)
        for _ in range(need):
            block = blocks.allocate(table[-1] if table else None)
            assert block is not None  # counted above
            table.append(block)
        hit = len(matched) * blocks.block_size
        if reuse:
            blocks.count_lookup(tokens, hit)
        # The prompt's other full blocks become findable now, while this row computes them: a
        # request with the same prefix admitted meanwhile waits for them instead of recomputing.
        blocks.register(table[len(matched) : len(hashes)], hashes[len(matched) :], id(seq))
        seq.table = table
        seq.length = hit
        seq.fed = max(0, hit - seq.virtual)
        seq.partial_logprobs = []
        return True

    def unreserve(self, seq: Seq) -> None:
        self.blocks.release(seq.table, id(seq))
        seq.table, seq.length, seq.fed = [], 0, 0

    def usage(self) -> tuple[int, int]:
        """Blocks referenced by rows, and blocks in the budget."""
        return self.blocks.used, self.blocks.num_blocks

    def remove(self, leaving: list[Seq]) -> None:
        """Drop rows from the batch and return their blocks (slots are released by the caller)."""
        if not leaving:
            return
        gone = {id(s) for s in leaving}
        engine = self.engine
        engine._running = [s for s in engine._running if id(s) not in gone]
        for seq in leaving:
            self.blocks.release(seq.table, id(seq))
            seq.table = []

    def reset(self) -> None:
        for seq in self.engine._running:
            self.blocks.release(seq.table, id(seq))
            seq.table = []

    # -- one iteration ---------------------------------------------------------------------------

    def step(self, admitted: list[Seq]) -> int:
        """Admit ``admitted`` into the batch and run one packed forward. Returns the prompt tokens
        computed."""
        engine = self.engine
        now = time.monotonic()
        for seq in admitted:
            seq.admitted_at = now
        with engine._cond:
            engine._running.extend(admitted)
        for seq in admitted:
            if seq.length < seq.virtual:
                try:
                    self._write_virtual(seq)
                except Exception as e:
                    logger.exception("prompt adapter KV of request %s failed", seq.handle.request_id)
                    self._fail_rows([seq], e)
        chunks = self._plan_chunks()
        if chunks:
            self._run(chunks)
        return sum(c.n for c in chunks if not c.decode)

    def _plan_chunks(self) -> list[_Chunk]:
        """This iteration's work: every decoding row (with a block for its next token, preempting
        when the budget is spent), then prompt chunks within ``max_prefill_tokens``."""
        engine = self.engine
        chunks: list[_Chunk] = []
        for seq in list(engine._running):
            if seq.prefilling or seq not in engine._running:
                continue
            if self._room_for_one(seq):
                chunks.append(_Chunk(seq, 1, decode=True))
        chunks = [c for c in chunks if c.seq in engine._running]  # less any row preempted since
        ready: list[Seq] = []
        for seq in list(engine._running):
            if not seq.prefilling or seq.length < seq.virtual:
                continue
            shared = self.blocks.pending(seq.table[: seq.length // self.blocks.block_size])
            if shared == "wait":  # its prefix is being computed by another row this moment
                continue
            if shared == "orphaned":  # that row left before computing it: start afresh
                self._preempt(seq)
                continue
            ready.append(seq)
        for seq, n in _share_prefill(ready, engine.max_prefill_tokens):
            chunks.append(_Chunk(seq, n, decode=False))
        return chunks

    def _room_for_one(self, seq: Seq) -> bool:
        """Make sure ``seq`` has a slot for its next token; preempt later rows if needed. False
        when ``seq`` itself was preempted."""
        blocks = self.blocks
        while seq.length >= len(seq.table) * blocks.block_size:
            block = blocks.allocate(seq.table[-1] if seq.table else None)
            if block is not None:
                seq.table.append(block)
                return True
            victim = self._victim(seq)
            if victim is None:  # cannot happen: the budget holds one max_context row
                raise RuntimeError("the KV cache budget cannot hold one row")
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _victim(self, needing: Seq) -> Seq | None:
        """The most recently admitted row other than ``needing`` (else ``needing`` itself)."""
        rows = [s for s in self.engine._running if s is not needing and s.table]
        if rows:
            return max(rows, key=lambda s: s.admitted_at)
        return None

    def _preempt(self, seq: Seq) -> None:
        """Return ``seq``'s blocks and requeue it at the front; it recomputes what it had."""
        engine = self.engine
        logger.info(
            "KV cache full: preempting request %s (%d tokens cached) to recompute later",
            seq.handle.request_id,
            seq.length,
        )
        with engine._cond:
            self.remove([seq])
            engine._release_slot(seq)
            seq.feed = seq.prompt + seq.generated
            seq.fed = seq.length = 0
            seq.partial_logprobs = []
            engine._requeue(seq)
        engine._counters["preemptions"] += 1
        engine._notify("on_preemption")

    def _write_virtual(self, seq: Seq) -> None:
        """Write a prompt adapter's virtual keys and values in front of the row's prompt."""
        adapter = seq.adapter
        assert isinstance(adapter, PromptAdapter)
        engine = self.engine
        if not adapter.has_kv:
            engine.slots.set_rows(None)
            compute_prompt_kv(engine.model, adapter, engine._model_config)
        start = seq.length
        for layer in range(self.blocks.layers):
            self.blocks.write(
                layer, seq.table, start, adapter.keys[layer][:, start:], adapter.values[layer][:, start:]
            )
        seq.length = seq.virtual
        self.blocks.written(seq.table, seq.length)

    # -- the forward -------------------------------------------------------------------------------

    def _run(self, chunks: list[_Chunk]) -> None:
        """The packed forward of ``chunks``; on failure, decode rows and each prefill row alone."""
        try:
            logits = self._forward(chunks)
        except Exception as e:
            decode = [c for c in chunks if c.decode]
            parts = ([decode] if decode else []) + [[c] for c in chunks if not c.decode]
            if len(parts) > 1:
                logger.exception("a packed forward of %d rows failed; retrying by part", len(chunks))
                for part in parts:
                    self._run(part)
                return
            logger.exception("forward failed; failing %d requests", len(chunks))
            self._fail_rows([c.seq for c in chunks], e)
            return
        self._consume(chunks, logits)

    def _forward(self, chunks: list[_Chunk]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Run the packed forward. Returns the logits of the kept positions and, per chunk, the
        range of its kept rows (``(start, count)``; count 0 when it keeps none)."""
        engine = self.engine
        blocks = self.blocks
        tokens: list[int] = []
        positions: list[int] = []
        rows: list[int] = []
        slots: list[torch.Tensor] = []
        segments: list[Segment] = []
        keep: list[int] = []
        kept: list[tuple[int, int]] = []
        for c in chunks:
            seq = c.seq
            q0 = len(tokens)
            if c.decode:
                tokens.append(seq.generated[-1])
            else:
                tokens.extend(seq.feed[seq.fed : seq.fed + c.n])
            positions.extend(range(seq.length, seq.length + c.n))
            rows.extend([seq.slot] * c.n)
            slots.append(blocks.slots(seq.table, seq.length, c.n))
            segments.append(Segment(q0, q0 + c.n, seq.length, seq.table))
            if self._wants_prompt_logprobs(c):
                kept.append((len(keep), c.n))
                keep.extend(range(q0, q0 + c.n))  # every position: prompt logprobs
            elif c.decode or c.finishes_prefill:
                kept.append((len(keep), 1))
                keep.append(q0 + c.n - 1)
            else:
                kept.append((len(keep), 0))
        plan = ForwardPlan(blocks, torch.cat(slots), segments)
        device = engine.device
        ids = torch.tensor(tokens, device=device)[:, None]
        pos = torch.tensor(positions, device=device)[:, None]
        row_slots = torch.tensor(rows)
        keep_t = torch.tensor(keep, dtype=torch.long)
        logits = engine._forward(
            ids, None, pos, PagedCacheView(plan), paged=plan, row_slots=row_slots, keep=keep_t
        )
        engine._counters["prefills"] += any(not c.decode for c in chunks)
        return logits, kept

    @staticmethod
    def _wants_prompt_logprobs(c: _Chunk) -> bool:
        return not c.decode and c.seq.prompt_logprobs_k is not None and c.seq.prompt_logprobs is None

    def _consume(self, chunks: list[_Chunk], result: tuple[torch.Tensor, list[tuple[int, int]]]) -> None:
        """Advance the rows past the forward, sample where a token is due, retire finished rows."""
        engine = self.engine
        logits, kept = result
        due: list[Seq] = []
        due_rows: list[int] = []
        for c, (k, count) in zip(chunks, kept, strict=True):
            seq = c.seq
            if self._wants_prompt_logprobs(c):
                self._gather_prompt_logprobs(seq, logits[k : k + c.n], c.n)
            seq.length += c.n
            if not c.decode:
                seq.fed += c.n
                self.blocks.written(seq.table, seq.length)
            if c.decode or not seq.prefilling:
                due.append(seq)
                due_rows.append(k + count - 1)
        if not due:
            return
        picks, logprobs = engine._sample(
            due, logits.index_select(0, torch.tensor(due_rows, device=logits.device))
        )
        finished = [
            seq
            for seq, pick, logprob in zip(due, picks, logprobs, strict=True)
            if engine._accept(seq, pick, logprob)
        ]
        if finished:
            with engine._cond:
                for seq in finished:
                    engine._release_slot(seq)
                self.remove(finished)

    def _gather_prompt_logprobs(self, seq: Seq, logits: torch.Tensor, n: int) -> None:
        """Prompt logprobs from one chunk's logits: position ``p`` predicts prompt token ``p + 1``;
        token 0 has none. Complete once the chunk that ends the prompt is in."""
        start = seq.fed
        k = int(seq.prompt_logprobs_k or 0)
        prompt = seq.prompt
        if start == 0:
            seq.partial_logprobs = [TokenLogprob(prompt[0], None, ())]
        targets = [j + 1 for j in range(start, start + n) if j + 1 < len(prompt)]
        if targets:
            seq.partial_logprobs.extend(
                token_logprobs(logits[: len(targets)], [prompt[t] for t in targets], [k] * len(targets))
            )
        if start + n >= len(prompt):
            seq.prompt_logprobs = tuple(seq.partial_logprobs)
            seq.partial_logprobs = []

    def _fail_rows(self, seqs: list[Seq], error: Exception) -> None:
        engine = self.engine
        with engine._cond:
            self.remove([s for s in seqs if s in engine._running])
        engine._fail(seqs, error)


__all__ = ["PagedBatch"]

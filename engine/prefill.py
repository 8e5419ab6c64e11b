"""When to start prefilling waiting prompts, and in chunks of what size.

Both decisions come from one fact measured on every backend: a forward pass
has a fixed cost (kernel launches, evaluation, cache upkeep) on top of a cost
per token, and on a GPU the fixed part dominates small batches. mlx-lm's
BatchGenerator runs prefill and decode as separate forwards, so every extra
prefill forward stalls all running streams by at least its fixed cost.

* Admission: a burst of clients reaches the engine over a few milliseconds
  (several HTTP workers, each forwarding what it has parsed). Prompts admitted
  as they trickle in would each pay a prefill forward, and every forward after
  the first delays the first tokens of all rows behind it; holding them while
  the burst is still arriving, briefly, prefills them together. A worker
  announces each request as its handler starts, ahead of the request itself,
  so the engine knows what is still on its way: a lone request is admitted
  the moment it comes, a burst that several workers parse at once waits for
  the slowest (``Announcements``).
* Chunk size: while streams decode, a prompt is fed in chunks costing a
  share of a decode step, so the running streams' token gaps stay within
  twice the idle ones. Chunking only spreads the same work over more
  forwards (each paying the fixed cost) and delays every prefilling row's
  first token by a decode step per extra chunk: a prefill that costs a few
  decode steps in all, or whose rows are at least as many as the decoding
  ones (the rest of a burst behind its first arrivals), is fed in full chunks.
  The costs are fitted, not assumed: ``seconds = fixed + per_token * tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass

# A chunk fed while streams decode should cost about this share of a decode step:
# it buys running streams' smoothness with the long prompt's wait (the trade at
# other shares: BENCHMARKS.md, "Measurements behind the defaults").
BUSY_PREFILL_SHARE = 0.3
# Per row; smaller chunks are mostly fixed cost. Low, because late in a long
# prompt a token costs attention over the whole context: on a CPU, 16 tokens at
# a 3,900-token context cost more than a decode step of 16 streams.
BUSY_PREFILL_MIN_TOKENS = 4
# Weight of the newest sample in the moving averages and in the cost fit.
COST_SMOOTHING = 0.2
# The longest a waiting prompt is held back while a burst is still arriving.
# Short next to a first token's cost on any model, long enough to gather a
# burst of HTTP clients (they reach the engine over tens of milliseconds).
ADMISSION_HOLD_MAX_S = 0.05
# An announced request not settled this long after is taken as gone (its
# handler killed between the two): far longer than any request's parsing.
ANNOUNCEMENT_EXPIRY_S = 1.0
# A prefill costing at most this many decode steps in all is not chunked:
# the running streams see one gap of that size (once per burst of short
# prompts) instead of the prompts' first tokens coming that many steps later.
WHOLE_PREFILL_MAX_STEPS = 4.0
# Most prompt tokens in one prefill forward (all rows together): its
# activations are the engine's peak memory. mlx_lm.server's defaults allow as
# many (8 prompts x 2,048 tokens); a burst of short prompts still fits whole.
PREFILL_FORWARD_TOKENS = 16384
# Below this spread of chunk sizes the fit cannot separate the fixed cost
# from the per-token one; the cost is then taken as proportional.
MIN_RELATIVE_SPREAD = 0.05


class LinearCost:
    """Exponentially weighted least-squares fit of ``seconds = fixed + per_token * tokens``.

    Until the samples spread enough to separate the two, the cost is taken as
    proportional to the tokens (``proportional``) or as flat: the mean."""

    def __init__(self, smoothing: float = COST_SMOOTHING, proportional: bool = True) -> None:
        self._alpha = smoothing
        self._proportional = proportional
        self._n = self._t = self._nn = self._nt = 0.0
        self.samples = 0

    def add(self, tokens: int, seconds: float) -> None:
        a = self._alpha if self.samples else 1.0
        self._n += a * (tokens - self._n)
        self._t += a * (seconds - self._t)
        self._nn += a * (tokens * tokens - self._nn)
        self._nt += a * (tokens * seconds - self._nt)
        self.samples += 1

    def fit(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds per token), or None before any sample."""
        if not self.samples or self._n <= 0:
            return None
        variance = self._nn - self._n * self._n
        if variance > (MIN_RELATIVE_SPREAD * self._n) ** 2:
            per_token = (self._nt - self._n * self._t) / variance
            if per_token > 0:
                return max(self._t - per_token * self._n, 0.0), per_token
        return (0.0, self._t / self._n) if self._proportional else (self._t, 0.0)


class Announcements:
    """Requests the workers announced (``Arriving``) and have not settled: on their way.

    Keyed by (worker, sequence number), so a Settled that overtakes its Arriving
    (they travel on two sockets) cancels it when it comes, and an announcement
    that is never settled expires instead of holding every burst after it."""

    def __init__(self) -> None:
        self._open: dict[tuple[bytes, int], float] = {}
        self._settled_early: dict[tuple[bytes, int], float] = {}

    def arriving(self, worker: bytes, seq: int, now: float) -> None:
        if self._settled_early.pop((worker, seq), None) is None:
            self._open[(worker, seq)] = now

    def settled(self, worker: bytes, seq: int, now: float) -> None:
        if self._open.pop((worker, seq), None) is None:
            self._settled_early[(worker, seq)] = now

    def drop(self, worker: bytes) -> None:
        """A worker went away: what it announced will not come."""
        for table in (self._open, self._settled_early):
            for key in [k for k in table if k[0] == worker]:
                del table[key]

    def pending(self, now: float) -> int:
        """Announced requests still on their way."""
        for table in (self._open, self._settled_early):
            if table:
                for key in [k for k, since in table.items() if now - since > ANNOUNCEMENT_EXPIRY_S]:
                    del table[key]
        return len(self._open)


@dataclass
class PrefillPolicy:
    max_chunk: int  # the configured prefill step size (tokens per row)

    def __post_init__(self) -> None:
        # A decode step's cost by the rows it decodes: a burst's first rows start
        # decoding a step before its tail is prefilled, and the tail's chunks are
        # sized against the batch that decodes beside them, not the one before.
        # Flat until it has seen several batch sizes: on a GPU a step costs
        # nearly the same at 2 rows as at 40.
        self.decode = LinearCost(proportional=False)
        self.prefill = LinearCost()
        # The latest prefill forward: (tokens, seconds). A prompt's chunks cost
        # more per token as its context grows (attention), which a fit over
        # every forward averages away; consecutive chunks have nearly the same context.
        self._latest: tuple[int, float] | None = None
        self._held_since: float | None = None
        self._held_for_announced = False

    # ---------------------------------------------------------------- costs

    def decode_step_s(self, rows: int) -> float:
        """A decode step's cost at ``rows`` streams (0 before any was measured)."""
        fit = self.decode.fit()
        if fit is None:
            return 0.0
        fixed, per_row = fit
        return fixed + per_row * max(rows, 1)

    def learn(
        self, decode_steps: int, decode_s: float, prompt_tokens: int, prompt_s: float, decoding_rows: int
    ) -> None:
        """One engine step's measurements (BatchGenerator's own timers): a step
        runs at most one decode forward, of ``decoding_rows`` streams, and one
        prefill forward.

        BatchGenerator pipelines decoding: each decode step queues the next
        one's forward before it returns. A step's prefill evaluation therefore
        waits for that queued decode forward first, and the next step's decode
        timer finds its tokens ready. So the decode cost is learnt from steps
        without prefill only, and a prefill chunk that ran beside decoding
        costs the step's whole time less one decode step."""
        if decode_steps and not prompt_tokens:
            self.decode.add(max(decoding_rows, 1), decode_s / decode_steps)
        if prompt_tokens:
            decode_step_s = self.decode_step_s(decoding_rows)
            if decode_steps and decode_step_s:
                prompt_s = max(decode_s + prompt_s - decode_step_s, 0.0)
            self.prefill.add(prompt_tokens, prompt_s)
            self._latest = (prompt_tokens, prompt_s)

    # ------------------------------------------------------------ decisions

    def admit(
        self, now: float, waiting: int, free_rows: int, arrived_since_last_step: int, busy: bool, announced: int = 0
    ) -> bool:
        """Whether waiting prompts may join the prefill batch this step
        (``announced``: requests the workers announced that have not come yet)."""
        self._held_for_announced = announced > 0
        hold = (
            0 < waiting < free_rows  # none waits, or a full prefill batch is already here
            # The burst is still arriving: announced, or (a busy engine's steps
            # pace the check) arriving between steps.
            and (announced > 0 or (busy and arrived_since_last_step > 0))
        )
        if hold:
            self._held_since = self._held_since if self._held_since is not None else now
            if now - self._held_since < ADMISSION_HOLD_MAX_S:
                return False
        self._held_since = None
        return True

    def hold_left(self, now: float) -> float:
        """Seconds an engine with nothing else to run may wait on its socket for
        the announced requests that hold its waiting ones (0: none hold them);
        their arrival ends the wait sooner."""
        if self._held_since is None or not self._held_for_announced:
            return 0.0
        return max(self._held_since + ADMISSION_HOLD_MAX_S - now, 0.0)

    def chunk(self, rows: int, decoding_rows: int, tokens_left: int) -> int:
        """Prompt tokens per row for this step's prefill forward of ``rows``
        prompts (``tokens_left`` still to prefill in all of them), while
        ``decoding_rows`` streams decode."""
        rows = max(rows, 1)
        full = min(self.max_chunk, max(1, PREFILL_FORWARD_TOKENS // rows))
        fit = self.prefill.fit()
        # Chunking spreads the same prompt work over more forwards: it shortens
        # the running streams' longest gaps, not their total wait, while every
        # extra forward costs all rows its fixed part and every prefilling row
        # a decode step more before its first token. When at least as many
        # prompts wait for a first token as streams decode (the rest of a
        # burst behind its first arrivals), or the whole prefill costs a few
        # decode steps, the first tokens win.
        decode_step_s = self.decode_step_s(decoding_rows)
        if not decoding_rows or fit is None or not decode_step_s or rows >= decoding_rows:
            return full
        fixed, per_token = fit
        if fixed + per_token * tokens_left <= WHOLE_PREFILL_MAX_STEPS * decode_step_s:
            return full
        if self._latest is not None:
            tokens, seconds = self._latest
            per_token = max(per_token, (seconds - fixed) / tokens)
        budget_s = BUSY_PREFILL_SHARE * decode_step_s - fixed
        # When the fixed cost alone exceeds the share (small batches on a GPU),
        # no chunk keeps the streams' gaps that short: make each forward count,
        # spending at least as much on tokens as on the forward itself.
        budget_s = max(budget_s, fixed)
        per_row = int(budget_s / per_token / rows)
        return min(full, max(BUSY_PREFILL_MIN_TOKENS, per_row))

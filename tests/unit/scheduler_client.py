"""An EngineClient over the real Scheduler, in the test's own thread: the frontend app and the
engine's scheduling, sampling and grammars together, without processes or sockets."""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Iterator

from engine.constraints import GrammarCompiler
from engine.core import Scheduler, SchedulerConfig
from engine.loading import LoadedModel
from ipc.messages import Generate, TokenDelta
from tests.unit.defaults import ENGINE_LIMITS

MAX_STEPS = 2000


class _SchedulerStream:
    def __init__(self, client: SchedulerClient, request_id: str) -> None:
        self.request_id = request_id
        self._client = client
        self.finished = False

    def watch(self, cancelled: Callable[[], bool]) -> None:
        pass

    def forwarded(self, timeout_s: float) -> bool:
        return True  # the scheduler has it from the submit on

    def wait(self, timeout_s: float) -> bool:
        return True  # the next delta is computed when iterating asks for it

    def __iter__(self) -> Iterator[TokenDelta]:
        while not self.finished:
            delta = self._client.next_delta(self.request_id)
            self.finished = delta.finish_reason is not None
            yield delta

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self._client.scheduler.abort([self.request_id])

    def __enter__(self) -> _SchedulerStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SchedulerClient:
    """Runs a scheduler step whenever a stream needs a delta; ``rewrite`` changes requests on the way in."""

    def __init__(self, loaded: LoadedModel, rewrite: Callable[[Generate], Generate] | None = None) -> None:
        info = loaded.info
        config = SchedulerConfig(
            eos_token_ids=tuple(info.eos_token_ids),
            vocab_size=info.vocab_size,
            context_length=info.context_length,
            **ENGINE_LIMITS,
        )
        grammars = GrammarCompiler(loaded.tokenizer, info.vocab_size, info.eos_token_ids)
        self.scheduler = Scheduler(loaded.model, config, grammars=grammars)
        self.model = info
        self.alive = True
        self.submitted: list[Generate] = []
        self._rewrite = rewrite
        self._deltas: dict[str, deque[TokenDelta]] = defaultdict(deque)

    def announce(self) -> None:
        pass  # requests reach the scheduler at their submit, nothing is on its way

    def settle(self) -> None:
        pass

    def submit(self, request: Generate) -> _SchedulerStream:
        if self._rewrite is not None:
            request = self._rewrite(request)
        self.submitted.append(request)
        self.scheduler.add(b"w", request)
        return _SchedulerStream(self, request.request_id)

    def next_delta(self, request_id: str) -> TokenDelta:
        for _ in range(MAX_STEPS):
            if self._deltas[request_id]:
                return self._deltas[request_id].popleft()
            for deltas in self.scheduler.step().values():
                for d in deltas:
                    self._deltas[d.request_id].append(d)
        raise AssertionError(f"no final delta for {request_id}")

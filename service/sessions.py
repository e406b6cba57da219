"""The SessionManager: per-session order, exactly-once steps, TTL, fork, rewind and generation.

Knows no FastAPI. Every operation loads a record from the Store, runs tokens through the
Scheduler, and writes the new record back with compare-and-set on its revision, so that two
replicas can never both apply a step on top of the same state. (Past 400 lines on purpose: the
ordering and exactly-once rules of every operation stay readable side by side in one class.)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np

from service.completion import Completer, blocklist_entries
from service.config import Settings
from service.errors import (
    HistoryExhausted,
    InputTooLong,
    ModelMismatch,
    SessionNotFound,
    StepConflict,
    StoreUnavailable,
    ValidationFailed,
)
from service.metrics import Metrics
from service.runner import Runner
from service.sampling import GenerateOptions, OnWord, Sampled, SampledWord, first_stop, sample
from service.scheduler import Scheduler, StepOutput
from service.store.base import SessionRecord, SessionStore, Snapshot
from service.store.codec import decode_state, encode_state
from vocab import continuation, detokenize

T = TypeVar("T")
# Retries when another replica or worker wrote the session between our read and write. Each round one
# contender wins, so with two writers a request loses k rounds in a row with probability about 2^-k: with 8,
# 50 concurrent steps on one session over --workers 2 would fail one of them in roughly 1 run of 5
# (50 x 2^-8); 32 makes that negligible, and the retries cost only under contention on one session.
CAS_ATTEMPTS = 32
ENCODE_CACHE_SIZE = 50_000  # short texts -> token ids; a few MB at most


class _SessionTurn:
    """An async context manager that waits for a session's turn; the lock is dropped when unused."""

    __slots__ = ("_lock", "_locks", "_session_id")

    def __init__(self, locks: dict[str, tuple[asyncio.Lock, int]], session_id: str) -> None:
        self._locks = locks
        self._session_id = session_id
        lock, users = locks.get(session_id) or (asyncio.Lock(), 0)
        locks[session_id] = (lock, users + 1)
        self._lock = lock

    async def __aenter__(self) -> None:
        await self._lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()
        lock, users = self._locks[self._session_id]
        if users == 1:
            del self._locks[self._session_id]
        else:
            self._locks[self._session_id] = (lock, users - 1)


def new_session_id() -> str:
    """192 random bits from `secrets`, URL-safe."""
    return secrets.token_urlsafe(24)


class Reply(dict[str, Any]):
    """A response body that also carries its JSON, serialized once: stored for replays, sent as-is."""

    body: bytes

    @classmethod
    def of(cls, data: dict[str, Any], body: bytes | None = None) -> Reply:
        reply = cls(data)
        reply.body = body if body is not None else json.dumps(data).encode()
        return reply


@dataclass(frozen=True)
class Encoded:
    ids: tuple[int, ...]  # immutable: cached and shared between requests
    unknown: tuple[str, ...]


Text = str | Sequence[int]  # words to feed: text, tokenized by the model's rules, or token ids


@dataclass(frozen=True)
class Continuation:
    """Words sampled after a prompt, from a zero state or a session's."""

    sampled: Sampled
    prompt_tokens: int
    unknown: tuple[str, ...]  # prompt words outside the vocabulary
    session_id: str | None
    step: int  # the session's step afterwards (stateless: prompt tokens + words)


class SessionManager:
    """Sessions over a Store, inference through the Scheduler."""

    def __init__(self, store: SessionStore, scheduler: Scheduler, runner: Runner, settings: Settings, metrics: Metrics):
        self.store = store
        self.scheduler = scheduler
        self.runner = runner
        self.vocab = runner.vocab
        self.settings = settings
        self.metrics = metrics
        self.model_version = runner.bundle.model_version
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._encoded: dict[str, Encoded] = {}
        self._store_timers: dict[str, Any] = {}
        vocab = self.vocab
        blocklists = [runner.bundle.blocklist_path, settings.blocklist]
        # The specials are never a completion of a typed word (<eos> is still a next word).
        specials = (vocab.pad_id, vocab.unk_id, vocab.eos_id)
        self.completer = Completer(vocab.words, vocab.normalize, specials, blocklist_entries(blocklists))
        metrics.blocked_words.set(self.completer.blocked_count)
        self._banned = self.completer.banned([vocab.pad_id, vocab.unk_id])  # never sampled
        zero_h, zero_c = runner.zero_state(1)
        # One immutable zero state shared by every session's first snapshot (bytes are never mutated).
        self._zero_state = encode_state(zero_h[:, 0], zero_c[:, 0])

    # ----- helpers -----------------------------------------------------------------------------

    def encode(self, text: Text) -> Encoded:
        if not isinstance(text, str):
            return self._check_ids(tuple(text))
        cached = self._encoded.get(text)
        if cached is not None:
            return cached
        ids, unknown = self.vocab.encode(text)
        encoded = self._check_ids(tuple(ids), tuple(unknown))
        if len(text) <= 64:  # keyboards send the same short words over and over
            if len(self._encoded) >= ENCODE_CACHE_SIZE:
                self._encoded.pop(next(iter(self._encoded)))
            self._encoded[text] = encoded
        return encoded

    def _check_ids(self, ids: tuple[int, ...], unknown: tuple[str, ...] = ()) -> Encoded:
        if len(ids) > self.settings.max_tokens_per_request:
            raise InputTooLong(
                f"the text has {len(ids)} tokens; the limit is {self.settings.max_tokens_per_request}",
                tokens=len(ids),
                limit=self.settings.max_tokens_per_request,
            )
        if not unknown and ids and not 0 <= min(ids) <= max(ids) < self.runner.vocab_size:
            bad = next(i for i in ids if not 0 <= i < self.runner.vocab_size)
            raise ValidationFailed(f"token id {bad} is outside the vocabulary (0 to {self.runner.vocab_size - 1})")
        return Encoded(ids, unknown)

    async def _run(
        self,
        tokens: Sequence[int],
        hidden: np.ndarray,
        cell: np.ndarray,
        k: int,
        prefix: str | None,
        explain: bool = False,
    ) -> StepOutput:
        """One scheduler call with what `suggestions` needs: the top list, or for a prefix the full row (and the
        gates of these tokens with explain)."""
        if prefix is None:
            return await self.scheduler.submit(tokens, hidden, cell, self.completer.fetch_k(k), explain=explain)
        return await self.scheduler.submit(tokens, hidden, cell, 1, want_log_probs=True, explain=explain)

    def suggestions(self, output: StepOutput, k: int, prefix: str | None = None) -> dict[str, Any]:
        """The ranked answer of one output: {"predictions"}, and for a prefix its {"completion"} too."""
        ranked = self.completer.rank(output.top_ids, output.top_log_probs, output.log_probs, k, prefix)
        if ranked.withheld:
            where = "predictions" if prefix is None else "completion"
            self.metrics.blocked_suggestions.labels(where).inc(ranked.withheld)
        return ranked.body(self.vocab.words)

    def expires_at(self, record: SessionRecord) -> float:
        return record.last_used_at + self.store.ttl_seconds

    def _state(self, record: SessionRecord) -> tuple[np.ndarray, np.ndarray]:
        if record.model_version != self.model_version:
            raise ModelMismatch(
                f"session {record.session_id!r} holds a state of model {record.model_version}; "
                f"this server runs {self.model_version}"
            )
        try:
            return decode_state(record.state, self.runner.layers, self.runner.hidden_size)
        except ValueError as exc:
            raise ModelMismatch(f"session {record.session_id!r} holds an unusable state: {exc}") from exc

    async def _timed(self, operation: str, call: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            return await call
        except StoreUnavailable:
            self.metrics.store_errors.labels(operation).inc()
            raise
        finally:
            timer = self._store_timers.get(operation)
            if timer is None:
                timer = self._store_timers[operation] = self.metrics.store_duration.labels(operation)
            timer.observe(time.perf_counter() - started)

    async def _load(self, session_id: str, owner: str) -> SessionRecord:
        record = await self._timed("get", self.store.get(session_id))
        # Another key's session looks exactly like a missing one: ids are not an oracle.
        if record is not None and secrets.compare_digest(record.owner, owner):
            return record
        lost = await self._timed("lost", self.store.lost(session_id)) if record is None else None
        if lost is None or not secrets.compare_digest(lost.owner, owner):
            raise SessionNotFound(session_id)
        if lost.reason == "expired":
            ttl = f"{self.settings.session_ttl_seconds:g} s idle (CELLGATE_SESSION_TTL_SECONDS)"
            raise SessionNotFound(session_id, lost.reason, f"session {session_id!r} expired after {ttl}")
        limit = f"{self.settings.max_sessions} sessions (CELLGATE_MAX_SESSIONS)"
        message = f"session {session_id!r} was evicted: the store holds at most {limit} and it was the least recent"
        raise SessionNotFound(session_id, lost.reason, message)

    def _ordered(self, session_id: str) -> _SessionTurn:
        """Serialise operations on one session in arrival order (asyncio.Lock is FIFO)."""
        return _SessionTurn(self._locks, session_id)

    def _history_after(self, record: SessionRecord, step: int, state: bytes, tokens: Sequence[int]) -> dict[str, Any]:
        """The history fields once `tokens` moved the session from record.step to step with `state`."""
        limit = self.settings.session_history
        if limit == 0:
            return {"history": (), "history_tokens": ()}
        if not tokens:  # nothing consumed: the last snapshot already is this state
            return {"history": record.history, "history_tokens": record.history_tokens}
        prior = record.history
        if not prior or prior[-1].step != record.step:  # the state before these tokens, shared not copied
            prior = (*prior, Snapshot(record.step, record.state))
        history = (*prior, Snapshot(step, state))
        all_tokens = (*record.history_tokens, *tokens)
        # Keep snapshots within the last `limit` tokens (always the current one).
        kept = tuple(s for s in history if s.step >= step - limit)
        drop = len(all_tokens) - (step - kept[0].step)
        return {"history": kept, "history_tokens": all_tokens[drop:]}

    def _response(self, record: SessionRecord, suggestions: dict[str, Any]) -> dict[str, Any]:
        return {
            "session_id": record.session_id,
            "step": record.step,
            "predictions": suggestions["predictions"],
            "expires_at": self.expires_at(record),
            **({"completion": suggestions["completion"]} if "completion" in suggestions else {}),
        }

    @staticmethod
    def fingerprint(kind: str, if_step: int | None, payload: Text, prefix: str | None = None) -> str:
        if not isinstance(payload, str):
            kind, payload = f"{kind}-ids", ",".join(map(str, payload))
        if prefix is not None:  # the answer depends on it; text holds no NUL (the schemas refuse controls)
            payload = f"{payload}\0prefix\0{prefix}"
        digest = hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        return f"{kind}:{if_step}:{digest}"

    async def _write(self, updated: SessionRecord, expected_revision: int) -> bool:
        return await self._timed("replace", self.store.replace(updated, expected_revision))

    # ----- operations -----------------------------------------------------------------------------

    async def predict(self, text: Text, k: int, prefix: str | None = None) -> Reply:
        """Stateless: the text from a zero state (and the word being typed, when a prefix is given)."""
        encoded = self.encode(text)
        hidden, cell = self.runner.zero_state(1)
        output = await self._run(encoded.ids, hidden[:, 0], cell[:, 0], k, prefix)
        self.metrics.tokens.labels("prefill").inc(len(encoded.ids))
        suggestions = self.suggestions(output, k, prefix)
        return Reply.of({**suggestions, "tokens": len(encoded.ids), "unknown": encoded.unknown})

    async def create(
        self, text: Text, k: int, owner: str, prefix: str | None = None, session_id: str | None = None
    ) -> Reply:
        """A new session primed with text; with session_id (chosen by the caller, who must keep different
        owners' ids apart), the session of that id starts over, whatever state it had."""
        if session_id is None:
            return await self._create(text, k, owner, prefix, new_session_id())
        async with self._ordered(session_id):
            return await self._create(text, k, owner, prefix, session_id)

    async def _create(self, text: Text, k: int, owner: str, prefix: str | None, session_id: str) -> Reply:
        encoded = self.encode(text)
        hidden, cell = self.runner.zero_state(1)
        output = await self._run(encoded.ids, hidden[:, 0], cell[:, 0], k, prefix)
        now = time.time()
        zero = self._zero_state
        base = SessionRecord(
            session_id=session_id,
            owner=owner,
            model_version=self.model_version,
            step=0,
            revision=0,
            state=zero,
            created_at=now,
            last_used_at=now,
        )
        step = len(encoded.ids)
        # Share one bytes object between the state and its snapshot: no second copy per session.
        state = encode_state(output.hidden, output.cell) if step else zero
        record = replace(base, step=step, state=state, **self._history_after(base, step, state, encoded.ids))
        await self._timed("create", self.store.create(record))
        self.metrics.sessions_created.inc()
        self.metrics.tokens.labels("prefill").inc(len(encoded.ids))
        response = self._response(record, self.suggestions(output, k, prefix))
        response["unknown"] = encoded.unknown
        return Reply.of(response)

    async def info(self, session_id: str, owner: str) -> dict[str, Any]:
        record = await self._load(session_id, owner)
        history = record.history
        return {
            "session_id": record.session_id,
            "step": record.step,
            "created_at": record.created_at,
            "last_used_at": record.last_used_at,
            "expires_at": self.expires_at(record),
            "model_version": record.model_version,
            "oldest_step": history[0].step if history else record.step,
        }

    async def delete(self, session_id: str, owner: str) -> None:
        async with self._ordered(session_id):
            await self._load(session_id, owner)
            if not await self._timed("delete", self.store.delete(session_id)):
                raise SessionNotFound(session_id)
            self.metrics.sessions_ended.labels("deleted").inc()

    async def step(
        self,
        session_id: str,
        text: Text,
        k: int,
        if_step: int | None,
        owner: str,
        explain: bool = False,
        prefix: str | None = None,
    ) -> Reply:
        """Advance the session through text, exactly once per if_step; a prefix alone reads and changes nothing."""
        encoded = self.encode(text)
        if prefix is not None and not encoded.ids:
            return await self._complete(session_id, k, if_step, owner, explain, prefix)
        fingerprint = self.fingerprint("step", if_step, text, prefix)
        async with self._ordered(session_id):
            for _ in range(CAS_ATTEMPTS):
                record = await self._load(session_id, owner)
                replay = self._check_if_step(record, if_step, fingerprint)
                if replay is not None:
                    return replay
                hidden, cell = self._state(record)
                output = await self._run(encoded.ids, hidden, cell, k, prefix, explain)
                reply, updated = self._apply(record, encoded, self.suggestions(output, k, prefix), output, fingerprint)
                if await self._write(updated, record.revision):
                    self.metrics.tokens.labels("step").inc(len(encoded.ids))
                    if output.gates is not None:
                        return Reply.of({**reply, "explain": self._explain(encoded.ids, output.gates)})
                    return reply
                # Another replica wrote first: with if_step the next pass reports the conflict or replays.
            raise StepConflict(record.step, "the session kept changing under this request; retry")

    async def _complete(
        self, session_id: str, k: int, if_step: int | None, owner: str, explain: bool, prefix: str
    ) -> Reply:
        """Complete the word being typed from the session's state: the state, step and record stay as they are."""
        async with self._ordered(session_id):  # in order with the steps around it, as a step would be
            record = await self._load(session_id, owner)
            if if_step is not None and if_step != record.step:
                self.metrics.step_conflicts.inc()
                raise StepConflict(record.step, f"if_step is {if_step} but the session is at step {record.step}")
            hidden, cell = self._state(record)
            output = await self._run((), hidden, cell, k, prefix, explain)
            reply = {**self._response(record, self.suggestions(output, k, prefix)), "unknown": []}
            if output.gates is not None:
                reply["explain"] = self._explain((), output.gates)
            return Reply.of(reply)

    def _check_if_step(self, record: SessionRecord, if_step: int | None, fingerprint: str) -> Reply | None:
        if if_step is None or if_step == record.step:
            return None
        if record.last_request == fingerprint and record.last_response:
            self.metrics.replays.inc()
            return Reply.of(json.loads(record.last_response), record.last_response)
        self.metrics.step_conflicts.inc()
        raise StepConflict(record.step, f"if_step is {if_step} but the session is at step {record.step}")

    def _apply(
        self, record: SessionRecord, encoded: Encoded, suggestions: dict[str, Any], output: StepOutput, fingerprint: str
    ) -> tuple[Reply, SessionRecord]:
        state = encode_state(output.hidden, output.cell)
        step = record.step + len(encoded.ids)
        now = time.time()
        draft = record.evolve(step=step, state=state, last_used_at=now)
        reply = Reply.of({**self._response(draft, suggestions), "unknown": encoded.unknown})
        updated = replace(
            draft,
            last_request=fingerprint,
            last_response=reply.body,
            **self._history_after(record, step, state, encoded.ids),
        )
        return reply, updated

    def _explain(self, ids: Sequence[int], gates: dict[str, np.ndarray]) -> dict[str, Any]:
        """Gates per token and layer (f, i, o, C̃, C) for the words just consumed, as the answer carries them."""
        return {
            "words": self.vocab.decode(ids),
            "layers": self.runner.layers,
            **{
                name: np.round(gates[name], 4).tolist()  # (T, L, H)
                for name in ("forget_gate", "input_gate", "output_gate", "candidate", "cell")
            },
        }

    async def fork(self, session_id: str, owner: str) -> Reply:
        record = await self._load(session_id, owner)
        hidden, cell = self._state(record)
        now = time.time()
        child = replace(
            record,
            session_id=new_session_id(),
            revision=0,
            created_at=now,
            last_used_at=now,
            last_request="",
            last_response=b"",
        )
        output = await self._run([], hidden, cell, 5, None)
        await self._timed("create", self.store.create(child))
        self.metrics.sessions_created.inc()
        return Reply.of(self._response(child, self.suggestions(output, 5)))

    async def rewind(self, session_id: str, to_step: int, k: int, if_step: int | None, owner: str) -> Reply:
        """Restore the state the session had after to_step tokens (exact: stored or recomputed)."""
        fingerprint = self.fingerprint("rewind", if_step, str(to_step))
        async with self._ordered(session_id):
            for _ in range(CAS_ATTEMPTS):
                record = await self._load(session_id, owner)
                replay = self._check_if_step(record, if_step, fingerprint)
                if replay is not None:
                    return replay
                self._state(record)  # refuses a foreign model's state
                if to_step > record.step:
                    self.metrics.step_conflicts.inc()
                    raise StepConflict(record.step, f"cannot rewind forward to {to_step}")
                history = record.history
                if not history or to_step < history[0].step:
                    raise HistoryExhausted(history[0].step if history else record.step, record.step)
                base = max((s for s in history if s.step <= to_step), key=lambda s: s.step)
                hidden, cell = decode_state(base.state, self.runner.layers, self.runner.hidden_size)
                offset = base.step - history[0].step
                replay_tokens = list(record.history_tokens[offset : offset + to_step - base.step])
                output = await self._run(replay_tokens, hidden, cell, k, None)
                state = base.state if not replay_tokens else encode_state(output.hidden, output.cell)
                kept = (*[s for s in history if s.step < to_step], Snapshot(to_step, state))
                draft = record.evolve(step=to_step, state=state, last_used_at=time.time())
                reply = Reply.of(self._response(draft, self.suggestions(output, k)))
                updated = replace(
                    draft,
                    history=kept,
                    history_tokens=record.history_tokens[: to_step - history[0].step],
                    last_request=fingerprint,
                    last_response=reply.body,
                )
                if await self._write(updated, record.revision):
                    return reply
            raise StepConflict(record.step, "the session kept changing under this request; retry")

    async def generate(
        self, session_id: str, options: GenerateOptions, owner: str, on_word: OnWord | None = None
    ) -> Reply:
        """Sample words from the session's state, advancing it through them (committed at the end)."""
        done = await self.continue_text("", options, owner, session_id, on_word)
        words = self.vocab.decode(done.sampled.ids)
        return Reply.of({"session_id": session_id, "words": words, "text": detokenize(words), "step": done.step})

    async def continue_text(
        self,
        prompt: Text,
        options: GenerateOptions,
        owner: str,
        session_id: str | None = None,
        on_word: OnWord | None = None,
    ) -> Continuation:
        """Sample words after prompt: from a zero state (session_id None: nothing is stored, as predict is to
        step), or from a session's state, which advances through the prompt and the words, written once."""
        encoded = self.encode(prompt)
        previous = self.vocab.words[encoded.ids[-1]] if encoded.ids else None
        if session_id is None:
            hidden, cell = self.runner.zero_state(1)
            output = await self._first(encoded.ids, hidden[:, 0], cell[:, 0], options)
            sampled = await self._sample(output, options, previous, len(encoded.ids), on_word)
            self._count_continuation(encoded, sampled, "prefill")
            return Continuation(sampled, len(encoded.ids), encoded.unknown, None, len(encoded.ids) + len(sampled.ids))
        async with self._ordered(session_id):
            record = await self._load(session_id, owner)
            hidden, cell = self._state(record)
            if previous is None and record.step:  # glue after the session's last word ("" when not kept)
                previous = self.vocab.words[record.history_tokens[-1]] if record.history_tokens else ""
            output = await self._first(encoded.ids, hidden, cell, options)
            sampled = await self._sample(output, options, previous, record.step + len(encoded.ids), on_word)
            consumed = (*encoded.ids, *sampled.ids)
            step = record.step + len(consumed)
            state = encode_state(sampled.last.hidden, sampled.last.cell)
            updated = record.evolve(
                step=step,
                state=state,
                last_used_at=time.time(),
                last_request="",
                last_response=b"",
                **self._history_after(record, step, state, consumed),
            )
            if not await self._write(updated, record.revision):
                raise StepConflict(record.step, "the session changed during generation; nothing was applied")
            self._count_continuation(encoded, sampled, "step")
            return Continuation(sampled, len(encoded.ids), encoded.unknown, session_id, step)

    async def _first(
        self, ids: Sequence[int], hidden: np.ndarray, cell: np.ndarray, options: GenerateOptions
    ) -> StepOutput:
        """The model's output after the prompt, with the full distribution sampling needs."""
        k = self.completer.fetch_k(max(1, options.logprobs))
        return await self.scheduler.submit(ids, hidden, cell, k, want_log_probs=True)

    async def _sample(
        self, output: StepOutput, options: GenerateOptions, previous: str | None, step: int, on_word: OnWord | None
    ) -> Sampled:
        """Up to options.max_words words after `output` (the model's output for the `step` tokens so far, the last
        of which is `previous`; None at the start of a text): same seed and state, same words. Blocked words
        are never sampled nor reported among the alternatives."""
        rng = np.random.default_rng(options.seed)
        blocked = self.completer.blocked if self.completer.blocked_count else None
        k = self.completer.fetch_k(max(1, options.logprobs))
        ids: list[int] = []
        text = ""
        for _ in range(options.max_words):
            assert output.log_probs is not None
            if blocked is not None and blocked[int(np.argmax(output.log_probs))]:
                self.metrics.blocked_suggestions.labels("generation").inc()
            word_id = sample(output.log_probs, rng, options.temperature, options.top_k, options.top_p, self._banned)
            word = self.vocab.words[word_id]
            alternatives: tuple[tuple[str, float], ...] = ()
            if options.logprobs:
                top = self.completer.top(output.top_ids, output.top_log_probs, options.logprobs)  # blocked words out
                alternatives = tuple(
                    (continuation(previous, self.vocab.words[i]), float(lp))
                    for i, lp in zip(top.ids.tolist(), top.log_probs.tolist(), strict=True)
                )
            sampled = SampledWord(word, continuation(previous, word), float(output.log_probs[word_id]), alternatives)
            ids.append(word_id)
            output = await self.scheduler.submit([word_id], output.hidden, output.cell, k, want_log_probs=True)
            text += sampled.text
            previous = word
            if on_word is not None:
                await on_word(sampled, step + len(ids))
            cut = first_stop(text, options.stop)
            if cut is not None:
                return Sampled(ids, text[:cut], "stop", output)
        return Sampled(ids, text, "length", output)

    def _count_continuation(self, prompt: Encoded, sampled: Sampled, kind: str) -> None:
        self.metrics.tokens.labels(kind).inc(len(prompt.ids))
        self.metrics.tokens.labels("generated").inc(len(sampled.ids))

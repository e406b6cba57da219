"""`cellgate chat`: an interactive loop against a running server, suggestions after each line, /undo by rewind."""

from __future__ import annotations

import sys

from cellgate.client import CellgateAPIError, Client, HistoryExhausted, SessionNotFound, StepResult

CHAT_HELP = "each line you type is one step; /undo takes the last line back, /quit ends"


def run_chat(url: str, api_key: str | None, text: str, k: int) -> int:
    """The loop `cellgate chat` runs against the server at url; returns the exit status."""

    def show(result: StepResult) -> None:
        words = "  ".join(f"{p.word} ({p.prob:.3f})" for p in result.predictions)
        print(f"step {result.step}: {words}", flush=True)

    prompt = "> " if sys.stdin.isatty() else ""
    try:
        with Client(url, api_key=api_key) as client:
            chat = Chat(client, text, k)
            print(f"session {chat.session.id}, model {client.model().version}: {CHAT_HELP}", file=sys.stderr)
            show(chat.session.last)
            try:
                while (line := _read_line(prompt)) is not None:
                    if line in ("/quit", "/exit"):
                        break
                    if line == "/undo":
                        result = chat.undo()
                        if result is None:
                            print("nothing to undo", file=sys.stderr)
                        else:
                            show(result)
                    elif line.startswith("/"):
                        print(f"unknown command {line!r}: {CHAT_HELP}", file=sys.stderr)
                    elif line:
                        show(chat.feed(line))
            finally:
                chat.session.delete()
    except CellgateAPIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


class Chat:
    """The chat loop's state: the session and the step before each line fed (what /undo rewinds to)."""

    def __init__(self, client: Client, text: str, k: int) -> None:
        self.client, self.text, self.k = client, text, k
        self.session = client.session(text, k=k)
        self.lines: list[str] = []
        self.befores: list[int] = []

    def feed(self, line: str) -> StepResult:
        before = self.session.current_step
        try:
            result = self.session.step(line, k=self.k)
        except SessionNotFound:
            print("the session expired; replaying your lines into a new one", file=sys.stderr)
            self.replay()
            before = self.session.current_step
            result = self.session.step(line, k=self.k)
        self.lines.append(line)
        self.befores.append(before)
        return result

    def undo(self) -> StepResult | None:
        if not self.lines:
            return None
        self.lines.pop()
        to_step = self.befores.pop()
        try:
            return self.session.rewind(to_step, k=self.k)
        except (HistoryExhausted, SessionNotFound):
            return self.replay()  # further back than the server keeps history: rebuild from the lines

    def replay(self) -> StepResult:
        """A new session fed the kept lines again, one step each."""
        self.session.delete()
        self.session = self.client.session(self.text, k=self.k)
        result = self.session.last
        self.befores = []
        for line in self.lines:
            self.befores.append(self.session.current_step)
            result = self.session.step(line, k=self.k)
        return result


def _read_line(prompt: str) -> str | None:
    try:
        return input(prompt).strip()
    except EOFError:
        return None

"""One behaviour for every interactive tool of the course (generate --interactive, --chat, the testers).

A learner meets the same session everywhere, so these rules hold in every project:

    a line          is answered (a continuation, a chat reply, a tokenization...)
    empty line      nothing happens: the prompt comes back (it never quits and never generates from nothing)
    /quit           quits; so does EOF (Ctrl-D), which first prints a newline so the shell starts a clean line
    /reset          starts a new conversation where the tool has one (chat); elsewhere it says there is none
    /help           lists these commands
    Ctrl-C          while an answer is being produced: stops that answer and the prompt comes back;
                    at the prompt: quits right after another Ctrl-C, otherwise says how to quit
    a bad line      (characters the model does not know, longer than the context, not UTF-8, ...) gives one
                    `error: ...` line on stderr, never on the same line as the echoed text, and the
                    prompt comes back: one bad line never ends a session

Tools give `run_session` a function `answer(line, out)` that writes its answer to `out` (a stream
that remembers whether it is at the start of a line) and raises CourseError for a bad line.
"""

from __future__ import annotations

import sys
from typing import Callable, TextIO

from course.errors import CourseError

COMMANDS = {"/quit": "quit (Ctrl-D does the same)", "/reset": "start a new conversation (where there is one)",
            "/help": "this list"}


class LineTracker:
    """A text stream wrapper that knows whether the last character written ended a line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.at_line_start = True

    def write(self, text: str) -> int:
        if text:
            self.stream.write(text)
            self.at_line_start = text.endswith("\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def end_line(self) -> None:
        """Start a new line unless already at the start of one."""
        if not self.at_line_start:
            self.write("\n")
        self.flush()


def is_utf8(text: str) -> bool:
    """False for text holding lone surrogates: how Python passes on bytes that were not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def run_session(answer: Callable[[str, LineTracker], object], *, prompt: str = "> ", banner: str | None = None,
                reset: Callable[[], object] | None = None, out: TextIO | None = None,
                err: TextIO | None = None) -> None:
    """Read lines until /quit, EOF or a second Ctrl-C; answer each by the rules of the module docstring."""
    out_t = LineTracker(out or sys.stdout)
    err = err or sys.stderr

    def say(message: str) -> None:  # errors and notes: on a line of their own, on stderr
        out_t.end_line()
        print(message, file=err, flush=True)

    if banner:
        print(banner, file=out_t, flush=True)
    interrupted = False  # the last thing that happened was a Ctrl-C
    while True:
        out_t.end_line()
        try:
            line = input(prompt)
        except EOFError:
            out_t.write("\n")
            out_t.flush()
            return
        except KeyboardInterrupt:
            if interrupted:
                out_t.write("\n")
                out_t.flush()
                return
            interrupted = True
            out_t.at_line_start = False  # the terminal is still on the prompt's line
            say("(Ctrl-C again, Ctrl-D or /quit quits)")
            continue
        except UnicodeDecodeError:
            interrupted = False
            say("error: that line is not UTF-8 text; type plain UTF-8 characters")
            continue
        interrupted = False
        # The user pressed Enter (or the line came from a pipe): the next output starts a fresh line.
        out_t.at_line_start = True
        stripped = line.strip()
        if not stripped:
            continue
        if not is_utf8(line):
            say("error: that line is not UTF-8 text; type plain UTF-8 characters")
            continue
        if stripped == "/quit":
            return
        if stripped == "/help":
            print("\n".join(f"  {c:<7} {h}" for c, h in COMMANDS.items()) + "\n  Ctrl-C  stops an answer; "
                  "twice quits\n  an empty line does nothing", file=out_t, flush=True)
            continue
        if stripped == "/reset":
            if reset is None:
                say("error: /reset: this tool has no conversation to reset (each line stands alone)")
            else:
                reset()
                print("(new conversation)", file=out_t, flush=True)
            continue
        try:
            answer(line, out_t)
            out_t.end_line()
        except KeyboardInterrupt:
            interrupted = True
            say("(stopped)")
        except CourseError as e:
            say(f"error: {' '.join(str(e).split())}")

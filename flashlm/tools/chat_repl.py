"""The `flashlm chat` loop: one user turn per input, answers streamed; works on a terminal and on a pipe.

On a terminal the prompt has line editing and a history kept across sessions (GNU readline from the standard
library: arrow keys, Ctrl-R, `~/.flashlm_history`, or `$XDG_STATE_HOME/flashlm/history`), a block between two
`\"\"\"` lines (or lines ending in a backslash) is one multi-line message, and slash commands are read here, never
sent to the model (/help lists them). Ctrl-C while the model answers stops that answer (the partial answer stays in
the history) and the session goes on; Ctrl-C at the prompt says how to quit, a second one in a row quits (exit
status 130, as llama.cpp's chat); Ctrl-D or /exit ends it (status 0).

On a pipe each line is one turn (slash commands work there too) and nothing but answers goes to stdout.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import TextIO

from flashlm.errors import ChatTemplateError, ContextLengthError, InvalidOptionError
from flashlm.options import GenerationOptions
from flashlm.runtime.chat import PLAIN_CHAT_STOP, PLAIN_CHAT_TEMPLATE, validate_messages

PROMPT, CONTINUATION = "> ", "... "
BLOCK = '"""'
HINT = "/help for commands, Ctrl-D to quit"
COMMANDS = {
    "/help": "this list",
    "/clear": "forget the conversation (the system prompt stays)",
    "/system TEXT": "set the system prompt and start over (/system alone shows it)",
    "/save FILE": "write the conversation to FILE (JSON messages)",
    "/load FILE": "continue the conversation written by /save",
    "/stats": "per-turn speed on or off (--verbose turns it on)",
    "/exit": "end the session (also /bye, Ctrl-D)",
}
HELP = "\n".join([f"  {name:<14} {what}" for name, what in COMMANDS.items()] + [
    f'  {BLOCK} ... {BLOCK}    a multi-line message (or end lines with \\)',
    "  //text         send a message that starts with /",
    "  Ctrl-C         stop the answer; twice at the prompt quits",
])


def history_path() -> str:
    state = os.environ.get("XDG_STATE_HOME")
    if state:
        return os.path.join(state, "flashlm", "history")
    return os.path.join(os.path.expanduser("~"), ".flashlm_history")


class _LineEditor:
    """readline on a terminal: editing, history recall and a history file; a no-op where readline is missing."""

    def __init__(self, path: str):
        try:
            import readline
        except ImportError:  # e.g. a Python built without it: plain input()
            self._readline = None
            return
        self._readline, self.path = readline, path
        readline.set_history_length(1000)
        try:
            readline.read_history_file(path)
        except OSError:  # none yet, or unreadable: start empty
            pass
        names = [c.split()[0] for c in COMMANDS] + ["/bye"]
        readline.set_completer(lambda text, i: ([n for n in names if n.startswith(text)] + [None])[i])
        readline.set_completer_delims(" \t\n")
        readline.parse_and_bind("tab: complete")

    def save(self) -> None:
        if self._readline is None:
            return
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self._readline.write_history_file(self.path)
        except OSError as e:
            print(f"flashlm: warning: could not save the chat history to {self.path}: {e.strerror or e}",
                  file=sys.stderr)


class ChatRepl:
    def __init__(self, model, opts: GenerationOptions, system_prompt: str | None, stats: bool = False,
                 stdin: TextIO | None = None, out: TextIO | None = None, err: TextIO | None = None):
        self.model, self.opts, self.stats = model, opts, stats
        self.stdin, self.out, self.err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
        self.interactive = self.stdin.isatty()
        self.system_prompt = system_prompt
        self.messages = self._base()

    def _base(self) -> list[dict]:
        return [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []

    def _say(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    # -- input -------------------------------------------------------------------------------------------
    def _input(self, prompt: str) -> str:
        if self.interactive:
            return input(prompt)
        line = self.stdin.readline()
        if line == "":
            raise EOFError
        return line.rstrip("\n")

    def _read_message(self) -> str:
        """One message: a line, a \"\"\" block or backslash-continued lines. EOFError at end of input,
        KeyboardInterrupt on Ctrl-C (a block in progress is dropped)."""
        line = self._input(PROMPT)
        if not self.interactive:  # a pipe: one turn per line
            return line
        if line.lstrip().startswith(BLOCK):
            first = line.lstrip()[len(BLOCK):]
            if first.rstrip().endswith(BLOCK) and first.strip():  # """one line"""
                return first.rstrip()[:-len(BLOCK)]
            lines = [first] if first else []
            while True:
                line = self._input(CONTINUATION)
                if line.rstrip().endswith(BLOCK):
                    lines.append(line.rstrip()[:-len(BLOCK)])
                    return "\n".join(lines).strip("\n")
                lines.append(line)
        lines = []
        while line.endswith("\\"):
            lines.append(line[:-1])
            line = self._input(CONTINUATION)
        return "\n".join(lines + [line])

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self) -> int:
        """The session; returns its exit status (0, or 130 when it ended by Ctrl-C)."""
        self._check_template()
        editor = _LineEditor(history_path()) if self.interactive else None
        if self.interactive:
            self._say(HINT)
        interrupts = 0
        try:
            while True:
                try:
                    text = self._read_message()
                except EOFError:
                    if self.interactive:
                        print(file=self.out, flush=True)
                    return 0
                except KeyboardInterrupt:
                    if not self.interactive:
                        return 130
                    interrupts += 1
                    if interrupts >= 2:
                        print(file=self.out, flush=True)
                        return 130
                    print(file=self.out, flush=True)
                    self._say("(Ctrl-C again or Ctrl-D to quit, /help for commands)")
                    continue
                interrupts = 0
                if not text.strip():
                    continue
                if text.startswith("/") and not text.startswith("//"):
                    if self._command(text.strip()) == "exit":
                        return 0
                    continue
                self._turn(text[1:] if text.startswith("//") else text)
        finally:
            if editor is not None:
                editor.save()

    def _command(self, line: str) -> str | None:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        handlers: dict[str, Callable[[str], str | None]] = {
            "/help": lambda a: self._say("Commands:\n" + HELP),
            "/?": lambda a: self._say("Commands:\n" + HELP),
            "/clear": self._clear, "/system": self._system, "/save": self._save, "/load": self._load,
            "/stats": self._toggle_stats, "/exit": lambda a: "exit", "/bye": lambda a: "exit",
            "/quit": lambda a: "exit",
        }
        handler = handlers.get(name)
        if handler is None:
            self._say(f"flashlm: unknown command {name} (/help lists them; //text sends a message that starts "
                      "with /)")
            return None
        return handler(arg)

    def _clear(self, _arg: str) -> None:
        self.messages = self._base()
        self._say("(conversation cleared)")

    def _system(self, text: str) -> None:
        if not text:
            self._say(f"system prompt: {self.system_prompt!r}" if self.system_prompt else "(no system prompt)")
            return
        self.system_prompt = text
        self.messages = self._base()
        self._say("(system prompt set; conversation cleared)")

    def _save(self, path: str) -> None:
        if not path:
            self._say("flashlm: /save needs a file name")
            return
        try:
            with open(os.path.expanduser(path), "w", encoding="utf-8") as fh:
                json.dump({"messages": self.messages}, fh, ensure_ascii=False, indent=1)
        except OSError as e:
            self._say(f"flashlm: {path}: cannot write ({e.strerror or e})")
            return
        self._say(f"(saved {len(self.messages)} messages to {path})")

    def _load(self, path: str) -> None:
        if not path:
            self._say("flashlm: /load needs a file name")
            return
        try:
            with open(os.path.expanduser(path), encoding="utf-8") as fh:
                doc = json.load(fh)
            messages = validate_messages(doc.get("messages") if isinstance(doc, dict) else doc)
        except OSError as e:
            self._say(f"flashlm: {path}: cannot read ({e.strerror or e})")
            return
        except (ValueError, InvalidOptionError) as e:  # not JSON, or not a list of messages
            self._say(f"flashlm: {path}: not a saved conversation ({e})")
            return
        self.messages = list(messages)
        system = [m["content"] for m in messages if m["role"] == "system"]
        self.system_prompt = system[0] if system else None
        self._say(f"(loaded {len(messages)} messages from {path})")

    def _toggle_stats(self, _arg: str) -> None:
        self.stats = not self.stats
        self._say(f"(per-turn stats {'on' if self.stats else 'off'})")

    def _turn(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})
        answer, r = [], None
        try:
            try:
                responses = self.model.chat(self.messages, stream=True, options=self.opts)
            except ContextLengthError as e:  # the history no longer fits ("stop"): say so, keep the session
                self._say(f"flashlm: {e}; /clear starts over, --ctx-overflow shift drops the oldest turns")
                self.messages.pop()
                return
            for r in responses:
                self.out.write(r.text)
                self.out.flush()
                answer.append(r.text)
        except KeyboardInterrupt:
            self.out.flush()
            print(" [stopped]", file=self.err, end="", flush=True)
            r = None
        print(file=self.out, flush=True)
        self.messages.append({"role": "assistant", "content": "".join(answer)})
        if r is None or r.finish_reason is None:
            return
        t = r.timings
        if r.finish_reason == "length" and t.eval_tokens == self.opts.max_tokens:
            self._say(f"[cut short: the answer reached -n {self.opts.max_tokens} tokens]")
        elif r.finish_reason == "length":
            self._say(f"[the context of {self.model.n_ctx} tokens is full: the answer was cut; --ctx-overflow "
                      "shift goes on]")
        if self.stats:
            self._say(f"[prompt {t.prompt_tokens} tokens ({t.cached_tokens} cached), {t.prompt_tps:.1f} tok/s; "
                      f"{t.eval_tokens} tokens, {t.eval_tps:.1f} tok/s]")

    # -- the model's template ----------------------------------------------------------------------------
    def _check_template(self) -> None:
        """A model without a chat template gets a plain User:/Assistant: transcript (what a base model can
        continue) and a warning; a model that looks like a base model gets a warning. Both once, on stderr."""
        m = self.model
        try:
            _ = m.chat_template  # the model's own template, built here: raises where there is none
        except ChatTemplateError as e:
            self._say(f"flashlm: warning: {e}: chatting in a plain 'User: / Assistant:' transcript instead; "
                      "a base model continues text rather than answering (an instruct model chats)")
            m.set_chat_template(PLAIN_CHAT_TEMPLATE)
            self.opts = replace(self.opts, stop=tuple(self.opts.stop) + (PLAIN_CHAT_STOP,))
            return
        reason = m.base_model_reason()
        if reason:
            self._say(f"flashlm: warning: {reason}: it is likely a base model, which continues text rather than "
                      "answering (an instruct or chat model answers)")


def run_repl(model, opts: GenerationOptions, system_prompt: str | None, stats: bool = False) -> int:
    """Run a chat session on stdin/stdout; returns the exit status (0, or 130 when ended by Ctrl-C)."""
    return ChatRepl(model, opts, system_prompt, stats).run()

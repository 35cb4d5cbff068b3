#!/usr/bin/env bash
# Drives `flashlm chat` in a tmux session as a user at a terminal would: /help, /stats recalled with the up arrow,
# Ctrl-C in the middle of an answer, another turn, Ctrl-D; then prints the captured screen.
#   tests/chat_tmux.sh                      # the `flashlm` on PATH and the default model
#   FLASHLM="python -m flashlm.cli" MODEL=path/to/model.gguf tests/chat_tmux.sh
# Exit status 0 when every step showed what it should and the chat exited with status 0. Run by
# tests/test_chat_repl.py::test_tmux_session_script (skipped where tmux is not installed).
set -euo pipefail

FLASHLM=${FLASHLM:-flashlm}
SESSION=flashlm-chat-$$
CHAT="$FLASHLM chat --temp 0 -n 64"
[ -n "${MODEL:-}" ] && CHAT="$CHAT -m $(printf %q "$MODEL")"

# the pane runs the chat itself (no shell prompt on the screen), then says how it exited
tmux new-session -d -s "$SESSION" -x 110 -y 50 "$CHAT; echo CHAT_EXIT=\$?; sleep 600"
trap 'tmux kill-session -t "$SESSION" 2>/dev/null || true' EXIT

screen() { tmux capture-pane -p -t "$SESSION" -S -500; }

fail() {
    echo "chat_tmux.sh: $1; the screen:" >&2
    screen >&2
    exit 1
}

# wait_for TEXT [N]: until TEXT shows on N lines of the screen (default 1); 120 s at most
wait_for() {
    local i
    for ((i = 0; i < 1200; i++)); do
        [ "$(screen | grep -cF -- "$1" || true)" -ge "${2:-1}" ] && return 0
        sleep 0.1
    done
    fail "'$1' did not show ${2:-1} time(s)"
}

# prompts N: until N chat prompts ("> " at the start of a line) have shown
prompts() {
    local i
    for ((i = 0; i < 1200; i++)); do
        [ "$(screen | grep -cE '^>( |$)' || true)" -ge "$1" ] && return 0
        sleep 0.1
    done
    fail "prompt $1 did not show"
}

# answer_started: until the line after the last prompt line has text (the model has begun to answer)
answer_started() {
    local i
    for ((i = 0; i < 1200; i++)); do
        screen | awk '/^>( |$)/{last=NR} {line[NR]=$0} END{exit !(last && line[last+1] ~ /[^ ]/)}' && return 0
        sleep 0.05
    done
    fail "the answer did not start"
}

wait_for "/help for commands, Ctrl-D to quit"
prompts 1
tmux send-keys -t "$SESSION" "/help" Enter
wait_for "/system TEXT"
prompts 2
tmux send-keys -t "$SESSION" "/stats" Enter
wait_for "(per-turn stats on)"
prompts 3
tmux send-keys -t "$SESSION" Up Enter          # history recall: /stats again
wait_for "(per-turn stats off)"
prompts 4
tmux send-keys -t "$SESSION" "Tell me a long story about a dragon." Enter
answer_started
tmux send-keys -t "$SESSION" C-c               # stops the answer, keeps the session
wait_for "[stopped]"
prompts 5
tmux send-keys -t "$SESSION" "What is the capital of France?" Enter
prompts 6
tmux send-keys -t "$SESSION" C-d
wait_for "CHAT_EXIT="
screen | sed -e :a -e '/^\n*$/{$d;N;ba' -e '}'   # the screen, without its blank tail
screen | grep -qF "CHAT_EXIT=0" || fail "the chat did not exit with status 0"

#!/usr/bin/env bash
# End-to-end pipeline. Orchestration only: every stage is a call of a project CLI.
#
#   ./run.sh                      set up, then run every stage on the embedded synthetic corpus
#   ./run.sh test [pytest args]   set up, then run the test suite (one worker per core, at most 4;
#                                 -n0 runs it in this process; -m slow --dist load: the slow tier)
#   ./run.sh --data SOURCES.yaml  run the stages on your own infrared sources (or --data FOLDER: one folder)
#   ./run.sh setup|synth|shards|pretrain|export|seg|det
#                                 run one stage (finished stages are skipped, interrupted ones resume)
#
# Options (before or after the stage name):
#   --data FILE|DIR  sources YAML for the shard builder, or one folder of frames (a source named after
#                    it, its subfolders included, not the visible or depth half of an infrared-visible
#                    dataset); default: the synthetic corpus
#   --config FILE    pre-training config (default: configs/pretrain/tiny.yaml, the CPU demo size)
#   --seg-config F   segmentation config (default: configs/finetune/seg_tiny.yaml on the synthetic pairs;
#                    your own config names its data.root)
#   --det-config F   detection config (default: configs/finetune/det_tiny.yaml on the synthetic pairs)
#   --seg-preset NAME, --det-preset NAME
#                    a dataset preset of configs/finetune/presets/ (mfnet, msrs_seg, soda, ..., flir_v1,
#                    llvip, ...) instead of a config; needs --seg-root / --det-root
#   --seg-root DIR, --det-root DIR
#                    the dataset folder as it unpacks (sets data.root of the seg / det config)
#   --seg-set K=V, --det-set K=V
#                    an override of the seg / det config (repeatable), e.g. --det-set data.split_dirs.val=valid
#   --out DIR        where outputs go (default: ./outputs)
#   --workers N      shard-builder worker processes (default: the CPUs it may use, quota included)
#   --ranker FILE    rank the region proposals with a ranker fitted to your camera
#                    (python -m data_tools proposals-fit; proposals.method=thermal_blobs_fitted)
#   --nproc N        training processes per node (N > 1: torchrun; one per GPU on GPU machines)
#   --nnodes N       nodes for torchrun: run the same training stage on every node, each with its
#                    --node-rank, after the shards (and export) exist on a shared filesystem
#   --node-rank R    this node's rank, 0 .. N-1 (default 0)
#   --master A:P     address and port of node 0 for the rendezvous (torchrun default 127.0.0.1:29500;
#                    the DeepSpeed launcher's default is the hostfile's first host)
#   --hostfile FILE  launch with the DeepSpeed launcher over the hosts of FILE, from one node
#                    (passwordless ssh; --nproc then sets the GPUs used per host)
#   --launcher-args "ARGS"  further arguments for torchrun or the DeepSpeed launcher, verbatim
#   --python PY      interpreter used to create the environment (default: python3)
#   -- ARGS          everything after -- goes to the trainer as config overrides (key=value)
# Environment: IRPT_VENV (default ./.venv) to place the environment elsewhere. The python -m CLIs
# (data_tools, pretrain, finetune) run in it: source .venv/bin/activate, or call .venv/bin/python.
# IRPT_PINS=none installs into IRPT_VENV without the tested pins, keeping the versions it already
# holds where pyproject.toml's ranges allow them (a cluster's own CUDA build of torch).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${IRPT_VENV:-$ROOT/.venv}"
PYTHON_BOOT="python3"
OUT="$ROOT/outputs"
DATA=""
WORKERS=""
RANKER=""
PRETRAIN_CONFIG="$ROOT/configs/pretrain/tiny.yaml"
SEG_CONFIG=""
DET_CONFIG=""
SEG_ROOT=""
DET_ROOT=""
SEG_SET=()
DET_SET=()
PRESETS="$ROOT/configs/finetune/presets"
NPROC=1
NPROC_SET=""
NNODES=1
NODE_RANK=0
MASTER="127.0.0.1:29500"
MASTER_SET=""
HOSTFILE=""
LAUNCHER_ARGS=()
EXTRA=()
STAGES=()
TEST_ARGS=()

say()  { printf '\n==> %s\n' "$*"; }
fail() { printf '\nERROR: %s\n' "$*" >&2; exit 1; }
# failed STATUS STAGE MESSAGE: a stage's command ended with STATUS. A stop after saving (75, a
# signal or Ctrl-C during training) and Ctrl-C (130) end run.sh with that same status, so that a
# wrapper which requeues on 75 sees it, and say how to go on; any other status fails with MESSAGE.
failed() {
  local rc="$1" stage="$2"
  shift 2
  case "$rc" in
    75)  printf '\nSTOPPED: stage %s stopped on a signal (Ctrl-C, preemption) and saved its state: %s\n' \
           "$stage" "rerun the same command to resume" >&2; exit 75 ;;
    130) printf '\nSTOPPED: stage %s interrupted (Ctrl-C); what it finished is kept: %s\n' \
           "$stage" "rerun the same command to go on" >&2; exit 130 ;;
    *)   fail "$@" ;;
  esac
}
# A path as the value of a key=value config override: single-quoted for YAML when it holds more than
# plain path characters, so that a folder named 'run #2' or 'a, b' reaches the config as written
# (unquoted, YAML reads ' #' as the start of a comment, ', ' and brackets as structure).
yaml_str() {
  if [[ "$1" =~ ^[A-Za-z0-9_./+-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\'}"; fi
}
# Arguments as one line that a shell reads back as the same words (printed commands can be rerun).
shell_words() {
  local words=() word q="'\\''"
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then words+=("$word"); else words+=("'${word//\'/$q}'"); fi
  done
  printf '%s' "${words[*]}"
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --data)    [[ -e "$2" ]] || fail "--data $2: no such file or folder (a sources YAML, or one folder of frames)"
               DATA="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"; shift 2 ;;
    --out)     [[ ! -e "$2" || -d "$2" ]] || fail "--out $2 is a file: give a folder for the pipeline's outputs"
               mkdir -p "$2"; OUT="$(cd "$2" && pwd)"; shift 2 ;;
    --workers) WORKERS="$2"; shift 2 ;;
    --ranker)  [[ -f "$2" ]] || fail "--ranker $2: no such file (fit one with python -m data_tools proposals-fit)"
               RANKER="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"; shift 2 ;;
    --config|--seg-config|--det-config)
               [[ -f "$2" ]] || fail "$1 $2: no such file (a YAML config)"
               case "$1" in
                 --config) PRETRAIN_CONFIG="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")" ;;
                 --seg-config) SEG_CONFIG="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")" ;;
                 --det-config) DET_CONFIG="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")" ;;
               esac
               shift 2 ;;
    --seg-preset|--det-preset)
               [[ -f "$PRESETS/$2.yaml" ]] || fail "no preset '$2'; choose one of: $(cd "$PRESETS" && ls *.yaml | sed 's/.yaml//' | tr '\n' ' ')"
               if [[ "$1" == --seg-preset ]]; then SEG_CONFIG="$PRESETS/$2.yaml"; else DET_CONFIG="$PRESETS/$2.yaml"; fi
               shift 2 ;;
    --seg-root|--det-root)
               [[ -d "$2" ]] || fail "$1 $2: not a folder"
               if [[ "$1" == --seg-root ]]; then SEG_ROOT="$(cd "$2" && pwd)"; else DET_ROOT="$(cd "$2" && pwd)"; fi
               shift 2 ;;
    --seg-set|--det-set)
               [[ "${2:-}" == ?*=* ]] || fail "$1 ${2:-}: expected key=value (an override of the ${1:2:3} config)"
               if [[ "$1" == --seg-set ]]; then SEG_SET+=("$2"); else DET_SET+=("$2"); fi
               shift 2 ;;
    --nproc)   NPROC="$2"; NPROC_SET=1; shift 2 ;;
    --nnodes)  NNODES="$2"; shift 2 ;;
    --node-rank) NODE_RANK="$2"; shift 2 ;;
    --master)  MASTER="$2"; MASTER_SET=1; shift 2 ;;
    --hostfile) [[ -f "$2" ]] || fail "hostfile not found: $2"
               HOSTFILE="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"; shift 2 ;;
    --launcher-args) read -r -a LAUNCHER_ARGS <<< "$2"; shift 2 ;;
    --)        shift; EXTRA=("$@"); break ;;
    --python)  PYTHON_BOOT="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/{/^#/p}' "$0"; exit 0 ;;
    test)      STAGES+=(test); shift; TEST_ARGS=("$@"); break ;;
    setup|synth|shards|pretrain|export|seg|det|all) STAGES+=("$1"); shift ;;
    *) fail "unknown argument '$1' (see ./run.sh --help)" ;;
  esac
done
[[ ${#STAGES[@]} -gt 0 ]] || STAGES=(all)
# Refuse before any work what a later stage would fail on.
for task in seg det; do
  cfg_var="${task^^}_CONFIG"; root_var="${task^^}_ROOT"
  if [[ "${!cfg_var}" == "$PRESETS/"* && -z "${!root_var}" ]]; then
    fail "--$task-preset $(basename "${!cfg_var}" .yaml) needs --$task-root DIR (the dataset folder as it unpacks)"
  fi
  if [[ -n "${!root_var}" && -z "${!cfg_var}" ]]; then
    fail "--$task-root needs --$task-preset NAME or --$task-config FILE"
  fi
done
for n in "$NPROC" "$NNODES" "$NODE_RANK"; do [[ "$n" =~ ^[0-9]+$ ]] || fail "not a number: '$n'"; done
[[ "$NODE_RANK" -lt "$NNODES" ]] || fail "--node-rank $NODE_RANK must be below --nnodes $NNODES"
[[ -z "$HOSTFILE" || "$NNODES" -eq 1 ]] || fail "--hostfile and --nnodes exclude each other (the DeepSpeed launcher reads the nodes from the hostfile)"

# --- set-up: a virtual environment with the pinned dependencies; a no-op when already done ---
# The pins tested with the environment's Python: constraints.txt (CI, Python >= 3.11), or the set for
# Python 3.10, which has no wheels of several of those versions.
pins_for() {
  local py="$1" said status=0
  [[ -x "$VENV/bin/python" ]] && py="$VENV/bin/python"
  said="$("$py" -c 'import sys; print(sys.version.split()[0]); sys.exit(sys.version_info < (3, 10))' 2>&1)" \
    || status=$?
  # One that does not run at all (not on PATH, a pyenv shim of a version not selected) is said as such.
  if [[ $status -eq 1 && "$said" =~ ^[0-9]+\.[0-9]+ ]]; then
    fail "$py is not Python >= 3.10 (Python $said): pass --python with one that is (python3.11, python3.12)"
  elif [[ $status -ne 0 ]]; then
    fail "$py does not run ($(printf %s "${said:0:400}" | tr '\n' ' ')): pass --python with a Python >= 3.10" \
      "that does (python3.11, or its full path)"
  fi
  if [[ "$said" =~ ^3\.10\. ]]; then echo "$ROOT/constraints-py310.txt"; else echo "$ROOT/constraints.txt"; fi
}

# An environment run.sh did not make (a cluster's, with its own CUDA build of torch) is installed into
# only when that keeps its torch and torchvision: with the pins, when it holds the pinned versions;
# with IRPT_PINS=none, when they lie in pyproject.toml's ranges. Otherwise pip would replace them.
# Reads the installed versions' metadata only (no import), with the environment's own Python.
check_foreign_env() {
  local pins="$1"
  "$VENV/bin/python" - "$ROOT/pyproject.toml" "$pins" "$VENV" <<'PYEOF' || exit 1
import importlib.metadata as md, re, sys
pyproject, pins, venv = sys.argv[1:]
def release(v):
    return tuple(int(x) for x in re.match(r"\d+(?:\.\d+)*", v).group().split("."))
for name in ("torch", "torchvision"):
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        continue
    if pins == "none":
        spec = re.search(rf'"{name}((?:[<>=!]=?[\d.]+,?)+)"', open(pyproject).read()).group(1)
        ok = all({">=": release(have) >= release(v), "<": release(have) < release(v)}[op]
                 for op, v in re.findall(r"(>=|<)([\d.]+)", spec))
        why = f"outside the supported range {spec} (pyproject.toml): pip would replace it"
    else:
        want = re.search(rf"^{name}==(\S+)", open(pins).read(), re.M).group(1)
        ok = release(have) == release(want)
        why = (f"which the set-up would replace with the tested {name}=={want} ({pins}); IRPT_PINS=none "
               "keeps the versions it holds where pyproject.toml's ranges allow them")
    if not ok:
        sys.exit(f"\nERROR: {venv} (IRPT_VENV) was not made by run.sh and holds {name} {have}, {why}; "
                 "or point IRPT_VENV at a new folder")
PYEOF
}

setup() {
  local stamp_src stamp pins
  pins="$(pins_for "$PYTHON_BOOT")" || exit 1
  [[ -z "${IRPT_PINS:-}" || "$IRPT_PINS" == none ]] \
    || fail "IRPT_PINS=$IRPT_PINS: leave it unset (the tested pins) or set it to 'none'"
  # IRPT_PINS=none once is remembered in an environment run.sh did not make (the marker below).
  if [[ "${IRPT_PINS:-}" == none ]] || grep -qx none "$VENV/.irpt-foreign" 2> /dev/null; then pins=none; fi
  stamp_src="$({ cat "$ROOT/pyproject.toml"; if [[ "$pins" == none ]]; then echo none; else cat "$pins"; fi; } \
    | sha256sum | cut -c1-16)"
  stamp="$VENV/.irpt-installed-$stamp_src"
  if [[ -f "$stamp" ]]; then return 0; fi
  # Foreign: it had a Python before run.sh first installed into it (marked then, so that a later
  # set-up is checked again; the marker says 'none' where it was installed into without the pins).
  local foreign=""
  if [[ -f "$VENV/.irpt-foreign" ]] \
     || { [[ -x "$VENV/bin/python" ]] && ! compgen -G "$VENV/.irpt-installed-*" > /dev/null; }; then
    foreign=1
    check_foreign_env "$pins"
  fi
  local pin_args=(-c "$pins") doing="creating $VENV and installing pinned dependencies (first run only, ~2 min)"
  if [[ "$pins" == none ]]; then pin_args=(); doing="installing into $VENV without the tested pins (IRPT_PINS=none)"; fi
  say "setup: $doing"
  local t0=$SECONDS
  [[ -x "$VENV/bin/python" ]] || "$PYTHON_BOOT" -m venv "$VENV" || fail "could not create a venv with $PYTHON_BOOT"
  "$VENV/bin/python" -m pip install -q "${pin_args[@]}" -e "$ROOT[test]" \
    || fail "dependency installation failed (see pip's message above)"
  rm -f "$VENV"/.irpt-installed-*
  if [[ -n "$foreign" ]]; then
    if [[ "$pins" == none ]]; then echo none; fi > "$VENV/.irpt-foreign"
  fi
  touch "$stamp"
  say "setup: done in $((SECONDS - t0)) s"
}

PY() { "$VENV/bin/python" "$@"; }

# Offline everywhere: no code path may reach a model hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

stage_synth() {
  [[ -n "$DATA" ]] && return 0
  if [[ -f "$OUT/synth/synth.json" ]]; then say "synth: $OUT/synth already generated"; return 0; fi
  say "synth: generating the embedded demo corpus in $OUT/synth"
  run_stage PY -m data_tools synth --out "$OUT/synth" || failed $? synth "stage synth failed"
}

stage_shards() {
  local sources="$DATA"
  if [[ -z "$sources" ]]; then
    sources="$OUT/synth/sources.yaml"
    [[ -f "$sources" ]] || stage_synth
  fi
  local wargs=() input=(--sources "$sources")
  if [[ -d "$sources" ]]; then  # one folder of frames: a source named after it (letters, digits, _ and -)
    local name
    name="$(printf '%s' "$(basename "$sources")" | tr -c 'A-Za-z0-9_-' '_')"
    [[ "$name" =~ ^[A-Za-z0-9] ]] || name="frames$name"
    input=(--source "$name=$sources")
  fi
  [[ -n "$WORKERS" ]] && wargs=(--workers "$WORKERS")
  [[ -n "$RANKER" ]] && wargs+=(proposals.method=thermal_blobs_fitted "proposals.ranker=$(yaml_str "$RANKER")")
  say "shards: building WebDataset shards with region proposals from $sources into $OUT/shards"
  run_stage PY -m data_tools build "${input[@]}" --out "$OUT/shards" "${wargs[@]}" \
    || failed $? shards "stage shards failed: fix what the error above names; the same command then resumes the build"
  if [[ "$OUT/shards/preview.png" -nt "$OUT/shards/manifest.json" ]]; then
    say "shards: verified and previewed before ($OUT/shards/preview.png)"; return 0
  fi
  run_stage PY -m data_tools verify "$OUT/shards" || failed $? shards "shard verification failed"
  run_stage PY -m data_tools preview "$OUT/shards" --out "$OUT/shards/preview.png" \
    || failed $? shards "shard preview failed"
}

# A stage's input that is missing is made by running the stage before it, except on a torchrun
# node of several: those would race on the shared output folder, so ask for it to be made once.
need() {  # need FILE STAGE
  [[ -f "$1" ]] && return 0
  [[ "$NNODES" -gt 1 ]] && fail "$1 is missing: run './run.sh $2' once (one node) before the multi-node stage"
  "stage_$2"
}

stage_pretrain() {
  need "$OUT/shards/manifest.json" shards
  if [[ -f "$OUT/pretrain/DONE" ]]; then
    say "pretrain: already done ($OUT/pretrain); delete that folder to train again"; return 0
  fi
  say "pretrain: MAE + PAD with $(basename "$PRETRAIN_CONFIG") on $OUT/shards into $OUT/pretrain (rerun to resume)"
  launch_stage pretrain pretrain train --config "$PRETRAIN_CONFIG" --run-dir "$OUT/pretrain" "${PRETRAIN_OVERRIDES[@]}"
  [[ -f "$OUT/pretrain/DONE" ]] || fail "stage pretrain stopped before the end (preempted?): rerun to resume"
}

stage_export() {
  need "$OUT/pretrain/DONE" pretrain
  # the JSON is written last (each file whole, by a rename): an export stopped between the two is redone
  if [[ -f "$OUT/backbone.pth" && "$OUT/backbone.json" -nt "$OUT/pretrain/DONE" ]]; then
    say "export: $OUT/backbone.pth is up to date"; return 0
  fi
  say "export: encoder + PAD adapters -> $OUT/backbone.pth"
  run_stage PY -m pretrain export "$OUT/pretrain" --out "$OUT/backbone.pth" || failed $? export "stage export failed"
}

launch_stage() {  # launch_stage STAGE MODULE ARGS...: launch, then say what the exit status means
  local stage="$1"
  shift
  run_stage launch "$@" || failed $? "$stage" "stage $stage failed or was interrupted: fix what the error above \
names (a config value, a path, the data), if anything; the same command then goes on from the last checkpoint"
}

# run_stage CMD...: run a stage's command (PY ... or launch ...) so that a stop reaches it and run.sh
# waits for it to save. Ctrl-C, or a SIGTERM to the whole process group, reaches the command itself. A
# signal to run.sh alone (docker stop, a pod's end, Ctrl-C under docker run without -t) is passed on:
# SIGINT as SIGTERM, since a command that also had the terminal's Ctrl-C takes a second SIGINT as "stop
# at once, unsaved", and a SIGTERM after a stop request as the same request. The command runs in the
# background because bash runs a trap only once a foreground command ends; `trap - INT` undoes the
# SIGINT that bash ignores in background commands. Returns the command's status, or 130 (Ctrl-C) / 75
# (another signal) where run.sh was signalled: what finished is kept, and nothing more is started.
run_stage() {
  local rc=0 ctrl_c="" term="" child=""
  trap 'ctrl_c=1; pass_on TERM' INT
  trap 'term=TERM; pass_on TERM' TERM
  trap 'term=USR1; pass_on USR1' USR1
  trap 'term=HUP; pass_on TERM' HUP  # the terminal hung up (its processes had it too): wait for them to save
  (
    trap - INT QUIT
    [[ "$1" == PY ]] && exec "$VENV/bin/python" "${@:2}"
    "$@"  # launch, which execs the launcher: the process signalled
  ) &
  child=$!
  [[ -z "$ctrl_c$term" ]] || pass_on "${term:-TERM}"  # a signal in the instant before the command started
  while :; do
    wait "$child" && rc=0 || rc=$?
    kill -0 "$child" 2>/dev/null || break  # a trapped signal ended the wait, not the command
  done
  between_commands_traps
  # 143 / 138 / 129: a SIGTERM / SIGUSR1 / SIGHUP to a launcher alone, passed on to its processes
  # (pretrain/engine/launchers.py)
  [[ -n "$ctrl_c" && $rc -ne 75 ]] && rc=130
  [[ -z "$ctrl_c" && ( -n "$term" || $rc -eq 143 || $rc -eq 138 || $rc -eq 129 ) ]] && rc=75
  return "$rc"
}

pass_on() { [[ -z "$child" ]] || kill -"$1" "$child" 2>/dev/null || true; }  # pass_on SIGNAL: to run_stage's child

# Outside a stage's command (set-up, the up-front check of the fine-tuning configs, the summary), a stop
# signal to run.sh ends it as soon as the command under way returns (bash runs a trap only then), before
# anything else starts: untrapped, a SIGINT to run.sh alone was lost there and the stages went on.
between_commands_traps() { trap 'stopped_between 130' INT; trap 'stopped_between 75' TERM USR1 HUP; }
stopped_between() {
  printf '\nSTOPPED: on a signal, before the next stage; the same command goes on from where it stopped\n' >&2
  exit "$1"
}

launch_processes() {  # the processes launch starts: the fine-tuning check needs it (BatchNorm's batch)
  if [[ -n "$HOSTFILE" ]]; then  # the DeepSpeed launcher: --nproc per host, or each host's slots
    awk -v n="${NPROC_SET:+$NPROC}" '!/^[ \t]*(#|$)/ { hosts++
        if (match($0, /slots=[0-9]+/)) slots += substr($0, RSTART + 6, RLENGTH - 6) }
      END { print (n ? n * hosts : (slots ? slots : hosts)) }' "$HOSTFILE"
  else
    echo $((NPROC * NNODES))
  fi
}

launch() {  # launch MODULE ARGS...: one process, torchrun, or the DeepSpeed launcher (printed first)
  # (the launchers through pretrain/engine/launchers.py: a stop on a signal ends in one line, 128 + signal)
  local cmd
  if [[ -n "$HOSTFILE" ]]; then
    cmd=("$VENV/bin/python" -m pretrain.engine.launchers deepspeed --hostfile "$HOSTFILE")
    [[ -n "$NPROC_SET" ]] && cmd+=(--num_gpus "$NPROC")
    [[ -n "$MASTER_SET" ]] && cmd+=(--master_addr "${MASTER%:*}" --master_port "${MASTER##*:}")
    cmd+=("${LAUNCHER_ARGS[@]}" --module "$@")
  elif [[ "$NPROC" -gt 1 || "$NNODES" -gt 1 ]]; then
    cmd=("$VENV/bin/python" -m pretrain.engine.launchers torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK"
         --nproc_per_node "$NPROC" --master_addr "${MASTER%:*}" --master_port "${MASTER##*:}"
         "${LAUNCHER_ARGS[@]}" -m "$@")
  else
    cmd=("$VENV/bin/python" -m "$@")
  fi
  printf '    %s\n' "$(shell_words "${cmd[@]}")"
  exec "${cmd[@]}"  # in launch_stage's background subshell: the launcher is the process signalled
}

# Fine-tuning stages: the exported backbone goes to IV-tuning (segmentation and detection). With
# the default configs they train on the synthetic infrared-visible pairs; a config of yours
# names its own data.root (and data.boxes.path for detection).
stage_finetune() {
  local task="$1" config="$2" root="$3"
  need "$OUT/backbone.pth" export
  if [[ -f "$OUT/$task/DONE" ]]; then
    say "$task: already done ($OUT/$task); delete that folder to train again"; return 0
  fi
  if [[ -z "$config" && -n "$DATA" ]]; then  # your frames pre-train; fine-tuning needs your labelled pairs
    finetune_sets "$task"
    local unused=""
    (( ${#SETS[@]} )) && unused=" (the --$task-set overrides given, ${SETS[*]}, apply to that config)"
    say "$task: skipped: --data gives pre-training frames only. To fine-tune on labelled data, add --$task-preset NAME --$task-root DIR (a benchmark as it unpacks; README: Dataset presets) or --$task-config YOUR.yaml (a copy of configs/finetune/${task}_vitb.yaml with data.root set)$unused"
    return 0
  fi
  [[ -n "$config" ]] || need "$OUT/synth/synth.json" synth
  finetune_args "$task" "$config" "$root"
  say "$task: IV-tuning of $OUT/backbone.pth with $(basename "$FT_CONFIG") into $OUT/$task (rerun to resume)"
  launch_stage "$task" finetune "$task" --config "$FT_CONFIG" --run-dir "$OUT/$task" "${FT_ARGS[@]}"
  [[ -f "$OUT/$task/DONE" ]] || fail "stage $task stopped before the end (preempted?): rerun to resume"
}

finetune_args() {  # finetune_args TASK CONFIG ROOT -> FT_CONFIG, FT_ARGS: what TASK's stage runs
  local task="$1" root="$3"
  FT_CONFIG="$2"
  FT_ARGS=("init.checkpoint=$(yaml_str "$OUT/backbone.pth")")  # the export stage's
  if [[ -z "$FT_CONFIG" ]]; then  # the embedded default, scored on the synthetic pairs' held-out frames
    FT_CONFIG="$ROOT/configs/finetune/${task}_tiny.yaml"
    FT_ARGS+=("data.root=$(yaml_str "$OUT/synth")" "data.train_split=train.txt" "data.val_split=val.txt")
    [[ "$task" == det ]] && FT_ARGS+=("data.boxes.path=$(yaml_str "$OUT/synth/labels")")
  fi
  [[ -n "$root" ]] && FT_ARGS+=("data.root=$(yaml_str "$root")")
  finetune_sets "$task"
  FT_ARGS+=("${SETS[@]}")  # last: the user's word wins
}

summary() {  # each package describes its own artefacts
  say "summary"
  {
    PY -m data_tools summary "$OUT/shards"
    if [[ -f "$OUT/pretrain/metrics.jsonl" ]]; then PY -m pretrain summary "$OUT/pretrain"; fi
    if [[ -f "$OUT/backbone.json" ]]; then PY -m pretrain summary "$OUT/backbone.pth"; fi
    for task in seg det; do
      if [[ -f "$OUT/$task/metrics.json" ]]; then PY -m finetune summary "$OUT/$task"; fi
    done
    for task in seg det; do  # what to run next: the trained model on frames of yours
      if [[ -f "$OUT/$task/DONE" ]]; then
        printf 'predict    %s   (the %s run on new frames)\n' \
          "$(PY -m finetune summary --predict-command "$OUT/$task")" "$task"
      fi
    done
  } | sed 's/^/  /'
}

finetune_sets() {  # SETS: the --seg-set / --det-set overrides of a task
  if [[ "$1" == seg ]]; then SETS=("${SEG_SET[@]}"); else SETS=("${DET_SET[@]}"); fi
}

# The configs of the stages to run, with the user's overrides, are checked (schema, files, dataset folders)
# before the first stage: a mistake must not surface after hours of shard building or pre-training.
stage_wanted() {  # stage_wanted NAME: this command runs stage NAME
  [[ " ${STAGES[*]} " == *" $1 "* || " ${STAGES[*]} " == *" all "* ]]
}

check_pretrain_inputs() {  # the pre-training config and -- overrides, before the shard build (hours on a corpus)
  stage_wanted pretrain || return 0
  [[ -f "$OUT/pretrain/DONE" ]] && return 0
  PY -m pretrain check --config "$PRETRAIN_CONFIG" --processes "$(launch_processes)" "${PRETRAIN_OVERRIDES[@]}" \
    > /dev/null || fail "the pre-training config above is not usable: fix what it names; nothing was run"
}

check_finetune_inputs() {
  local task config root later
  for task in seg det; do
    stage_wanted "$task" || continue
    config="$SEG_CONFIG"; root="$SEG_ROOT"
    [[ "$task" == det ]] && { config="$DET_CONFIG"; root="$DET_ROOT"; }
    [[ -z "$config" && -n "$DATA" ]] && continue  # the stage is skipped
    finetune_args "$task" "$config" "$root"
    later=(--init-written-later)  # the export stage writes it
    if [[ -z "$config" ]]; then  # the embedded default: its frames are the synth stage's
      (( ${#SETS[@]} )) || continue  # as shipped: nothing of the user's to check
      later+=(--data-written-later)
    fi
    PY -m finetune check --processes "$(launch_processes)" "${later[@]}" --config "$FT_CONFIG" "${FT_ARGS[@]}" \
      || fail "the $task config above is not usable: fix what it names; nothing was run"
  done
}

between_commands_traps
setup
PRETRAIN_OVERRIDES=("data.shards=[{path: $(yaml_str "$OUT/shards")}]" "${EXTRA[@]}")
check_pretrain_inputs
check_finetune_inputs
for stage in "${STAGES[@]}"; do
  case "$stage" in
    setup)  ;;
    test)   say "test: running the test suite"
            # pytest-xdist, whole modules per worker (a module's fixtures are built once): most tests
            # wait on the processes they launch, so a second worker on two cores takes about a fifth
            # off the suite (BENCHMARKS.md, Test suite).
            workers=$(nproc); (( workers > 4 )) && workers=4
            cd "$ROOT" && PY -m pytest -n "$workers" --dist loadfile "${TEST_ARGS[@]}" ;;
    synth)  stage_synth ;;
    shards) stage_shards ;;
    pretrain) stage_pretrain ;;
    export) stage_export ;;
    seg)    stage_finetune seg "$SEG_CONFIG" "$SEG_ROOT" ;;
    det)    stage_finetune det "$DET_CONFIG" "$DET_ROOT" ;;
    all)    stage_synth; stage_shards; stage_pretrain; stage_export
            stage_finetune seg "$SEG_CONFIG" "$SEG_ROOT"; stage_finetune det "$DET_CONFIG" "$DET_ROOT"; summary ;;
  esac
done

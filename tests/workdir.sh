# Sourced by the demo and VM scripts: their work directory. `work_args "$@"` reads
# [--keep] [WORKDIR]; without WORKDIR a temporary one is made, and `work_done` removes it
# after a passing run unless --keep was given (a failed run keeps it: it holds the logs).
# A WORKDIR given is the caller's, kept and reused.
work_args() {
  keep_work=0 work= made_work=0
  local arg
  for arg in "$@"; do
    case $arg in
      --keep) keep_work=1 ;;
      *) work=$arg ;;
    esac
  done
  if [[ -z $work ]]; then
    work=$(mktemp -d "/tmp/atom-${work_prefix:-run}.XXXXXX")
    made_work=1
  fi
  mkdir -p "$work"
  work=$(cd "$work" && pwd)
}
work_done() {
  if ((made_work && !keep_work)); then
    rm -rf "$work"
    echo "    work directory $work removed (--keep keeps it)"
  else
    echo "    files are in $work"
  fi
}

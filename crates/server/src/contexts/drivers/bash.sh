# nanoclaw's bash code-context driver: run by `bash -c` inside a sandbox
# (embedded in the nanoclaw binary, never written to disk). Same protocol as
# python.py, except for the request, which bash cannot parse as JSON:
#   "<n_env> <n_lines>\n", then n_env lines "NAME=value", then the code's
#   n_lines lines.
# Cells run in this shell (eval inside a function), so variables, functions
# and the working directory persist. SIGINT returns from the cell.
__nc_mark=$'\x1e'"$NANOCLAW_CONTEXT_NONCE"
unset NANOCLAW_CONTEXT_NONCE
exec {__nc_req}<&0 0</dev/null
if [ -n "$NANOCLAW_CONTEXT_CWD" ]; then
    if ! cd -- "$NANOCLAW_CONTEXT_CWD" 2>/dev/null; then
        printf '%s{"type":"ready","error":"cannot use the working directory %s"}\n' "$__nc_mark" "${NANOCLAW_CONTEXT_CWD//[\"\\]/_}"
        exit 0
    fi
fi
unset NANOCLAW_CONTEXT_CWD
__nc_count=0
__nc_cell() { eval "$1"; }
trap 'return 130' INT
printf '%s{"type":"ready"}\n' "$__nc_mark"
while IFS=' ' read -r -u "$__nc_req" __nc_nenv __nc_nlines; do
    __nc_env=()
    __nc_lines=()
    [ "$__nc_nenv" -gt 0 ] && mapfile -t -n "$__nc_nenv" -u "$__nc_req" __nc_env
    [ "$__nc_nlines" -gt 0 ] && mapfile -t -n "$__nc_nlines" -u "$__nc_req" __nc_lines
    __nc_count=$((__nc_count + 1))
    printf '%s{"type":"number_of_executions","execution_count":%d}\n' "$__nc_mark" "$__nc_count"
    __nc_saved=()
    for __nc_kv in "${__nc_env[@]}"; do
        __nc_k=${__nc_kv%%=*}
        if [ -n "${!__nc_k+x}" ]; then __nc_saved+=("$__nc_k=${!__nc_k}"); else __nc_saved+=("$__nc_k"); fi
        export "$__nc_kv"
    done
    __nc_code=$(printf '%s\n' "${__nc_lines[@]}")
    __nc_cell "$__nc_code"
    __nc_status=$?
    for __nc_kv in "${__nc_saved[@]}"; do
        case $__nc_kv in
        *=*) export "$__nc_kv" ;;
        *) unset "$__nc_kv" ;;
        esac
    done
    if [ "$__nc_status" -ne 0 ]; then
        printf '%s{"type":"error","name":"ExitCode","value":"exit status %d","traceback":""}\n' "$__nc_mark" "$__nc_status"
    fi
    printf '%s{"type":"end"}\n' "$__nc_mark"
    printf '%s{"type":"end"}\n' "$__nc_mark" >&2
done

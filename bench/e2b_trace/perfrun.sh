#!/bin/bash
# The measured part of a hold-mode script (trace.py / ctrace.py) runs while perf records
# system-wide tracepoints; OUT.txt gets `perf script` output for stages.py / ctstages.py.
# Example: bench/e2b_trace/perfrun.sh /tmp/st python3 bench/e2b_trace/trace.py ./nanoclaw hold   (HOLDN=150)
# perfrun.sh OUT SCRIPT ARGS... : run a hold-mode script, record tracepoints while it runs its measured part
out=$1; shift
GO=${TRACE_GO:-/tmp/e2b-trace-go}; export TRACE_GO=$GO; rm -f $GO
("$@" > $out.log 2>&1 &)
for i in $(seq 90); do grep -q holding $out.log && break; sleep 1; done
E="sched:sched_process_fork,sched:sched_process_exec,sched:sched_process_exit"
for s in recvfrom writev sendmsg sendto fsync seccomp execve connect accept4 clone exit_group recvmsg pread64 write $EXTRA; do E="$E,syscalls:sys_enter_$s"; done
E="$E,syscalls:sys_exit_fsync,syscalls:sys_exit_clone,syscalls:sys_exit_execve"
perf record -a -o $out.data -e "$E" > $out.perflog 2>&1 & P=$!
sleep 1.5; touch $GO
for i in $(seq 600); do grep -q done $out.log && break; sleep 0.5; done
kill -INT $P; wait $P
perf script -i $out.data -F comm,tid,time,event,trace 2>/dev/null | grep -v "^ *python\|^ *perf \|rustc\|cargo\|cc1\|ld\b" > $out.txt
rm -f $out.data
cat $out.log | tail -5

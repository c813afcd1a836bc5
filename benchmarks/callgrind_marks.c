/* Callgrind client requests for benchmarks/instructions.py (built by it with the system C compiler). */
#include <valgrind/callgrind.h>

void marks_start(void) { CALLGRIND_START_INSTRUMENTATION; }
void marks_zero(void) { CALLGRIND_ZERO_STATS; }
void marks_dump(const char *label) { CALLGRIND_DUMP_STATS_AT(label); }

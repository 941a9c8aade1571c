/* pyccl native core: the proxy's watchdog, a thread that needs no GIL.
 *
 * The proxy engine (ccl/engines/proxy/) makes the GPU's stream wait on words of pinned host
 * memory that a Python thread, the proxy, sets when a call's network phase is done. A host
 * call that waits for the device while holding the GIL (a process's first torch.cuda.Stream())
 * stops that thread, and with it the stream, for good: every Python-side timeout needs the GIL
 * too. This thread watches the same words without the GIL: while the device has posted a call
 * the host has not finished (posted > handled) and neither the pass counter nor `handled`
 * moves for `timeout` seconds, it sets the abort word, releases every stream wait (sets the
 * words the streams wait on) and records when it fired; the Python side then raises. Its
 * decision is pyccl_watchdog_check, whose Python twin is ccl/engines/proxy/watchdog.py's
 * `check` (tests/test_proxy_watchdog.py compares them).
 */
#ifndef PYCCL_WATCHDOG_H
#define PYCCL_WATCHDOG_H

#include <stddef.h>
#include <stdint.h>

/* Where the watched words are (indices into the uint64 word array) */
typedef struct pyccl_watch_layout {
    uint64_t posted, handled, beat, abort_word, fired;
    uint64_t release_lo, release_n;     /* words set to 1 when it fires (the stream waits) */
} pyccl_watch_layout;

/* The state one check carries to the next */
typedef struct pyccl_watch_state {
    uint64_t seen_handled, seen_beat;
    int64_t progress_ns;                /* when the host last made progress (or was idle) */
} pyccl_watch_state;

/* One look at the words at time now_ns: returns 1 when the host has stalled for longer than
 * timeout_ns with a call outstanding (the caller then fires), else 0, updating `st`. */
int pyccl_watchdog_check(const volatile uint64_t *words, const pyccl_watch_layout *lay,
                         pyccl_watch_state *st, int64_t now_ns, int64_t timeout_ns);

/* Fire: the abort word, every release word, and `fired` = now_ns (monotonic clock). */
void pyccl_watchdog_fire(volatile uint64_t *words, const pyccl_watch_layout *lay, int64_t now_ns);

typedef struct pyccl_watchdog pyccl_watchdog;

/* Start the thread over `words` (which must outlive pyccl_watchdog_stop): a check every
 * period_s seconds. NULL if the thread cannot be made. */
pyccl_watchdog *pyccl_watchdog_start(volatile uint64_t *words, const pyccl_watch_layout *lay,
                                     double timeout_s, double period_s);

/* Stop and join the thread; returns 1 if it had fired. */
int pyccl_watchdog_stop(pyccl_watchdog *w);

/* CLOCK_MONOTONIC in nanoseconds (the clock the thread uses, for the tests). */
int64_t pyccl_monotonic_ns(void);

#endif

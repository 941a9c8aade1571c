/* The proxy's watchdog: see watchdog.h. */
#define _POSIX_C_SOURCE 200809L
#include "watchdog.h"

#include <pthread.h>
#include <stdlib.h>
#include <time.h>

int64_t pyccl_monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int pyccl_watchdog_check(const volatile uint64_t *words, const pyccl_watch_layout *lay,
                         pyccl_watch_state *st, int64_t now_ns, int64_t timeout_ns) {
    uint64_t posted = words[lay->posted], handled = words[lay->handled], beat = words[lay->beat];
    if (posted <= handled || handled != st->seen_handled || beat != st->seen_beat) {
        st->seen_handled = handled;     /* idle, or progress since the last look */
        st->seen_beat = beat;
        st->progress_ns = now_ns;
        return 0;
    }
    return now_ns - st->progress_ns > timeout_ns;
}

void pyccl_watchdog_fire(volatile uint64_t *words, const pyccl_watch_layout *lay, int64_t now_ns) {
    words[lay->abort_word] = 1;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    for (uint64_t i = 0; i < lay->release_n; i++) words[lay->release_lo + i] = 1;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    words[lay->fired] = (uint64_t)now_ns;
}

struct pyccl_watchdog {
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int stop, fired;
    volatile uint64_t *words;
    pyccl_watch_layout lay;
    int64_t timeout_ns, period_ns;
};

static void *watch(void *arg) {
    pyccl_watchdog *w = (pyccl_watchdog *)arg;
    pyccl_watch_state st = {0, 0, pyccl_monotonic_ns()};
    pthread_mutex_lock(&w->lock);
    while (!w->stop) {
        int64_t now = pyccl_monotonic_ns();
        if (pyccl_watchdog_check(w->words, &w->lay, &st, now, w->timeout_ns)) {
            pyccl_watchdog_fire(w->words, &w->lay, now);
            w->fired = 1;
            /* a call whose out launch read the abort word clear just before may reset its
             * release words after this: set them once more a moment later (as ProxyHost.abort) */
            struct timespec later;
            clock_gettime(CLOCK_REALTIME, &later);
            later.tv_nsec += 50000000L;
            if (later.tv_nsec >= 1000000000L) { later.tv_sec += 1; later.tv_nsec -= 1000000000L; }
            pthread_cond_timedwait(&w->cond, &w->lock, &later);
            pyccl_watchdog_fire(w->words, &w->lay, (int64_t)w->words[w->lay.fired]);
            break;
        }
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        int64_t ns = until.tv_nsec + w->period_ns;
        until.tv_sec += ns / 1000000000LL;
        until.tv_nsec = ns % 1000000000LL;
        pthread_cond_timedwait(&w->cond, &w->lock, &until);
    }
    pthread_mutex_unlock(&w->lock);
    return NULL;
}

pyccl_watchdog *pyccl_watchdog_start(volatile uint64_t *words, const pyccl_watch_layout *lay,
                                     double timeout_s, double period_s) {
    pyccl_watchdog *w = (pyccl_watchdog *)calloc(1, sizeof(*w));
    if (w == NULL) return NULL;
    w->words = words;
    w->lay = *lay;
    w->timeout_ns = (int64_t)(timeout_s * 1e9);
    w->period_ns = (int64_t)(period_s * 1e9);
    if (w->period_ns < 1000000) w->period_ns = 1000000;
    pthread_mutex_init(&w->lock, NULL);
    pthread_cond_init(&w->cond, NULL);
    if (pthread_create(&w->thread, NULL, watch, w) != 0) {
        pthread_cond_destroy(&w->cond);
        pthread_mutex_destroy(&w->lock);
        free(w);
        return NULL;
    }
    return w;
}

int pyccl_watchdog_stop(pyccl_watchdog *w) {
    if (w == NULL) return 0;
    pthread_mutex_lock(&w->lock);
    w->stop = 1;
    pthread_cond_signal(&w->cond);
    pthread_mutex_unlock(&w->lock);
    pthread_join(w->thread, NULL);
    int fired = w->fired;
    pthread_cond_destroy(&w->cond);
    pthread_mutex_destroy(&w->lock);
    free(w);
    return fired;
}

/* pyccl ibverbs core (see ibverbs.h): libibverbs.so.1 is opened with dlopen on first use,
 * so this file builds everywhere and a machine without rdma-core only loses the transport.
 *
 * Kept small on purpose: opening a device port, memory registration, RC queue pairs and
 * their state changes, posting RDMA WRITE (with immediate) and zero-length receives, and
 * polling a completion queue.  The protocol (credits, message matching, errors) lives in
 * transports/ibverbs.py; the calls here are the per-message hot path and release the GIL.
 */
#ifdef PYCCL_VERBS_MODULE      /* only native/build_verbs.py compiles this (into pyccl._verbs) */
#define _GNU_SOURCE
#include "ibverbs.h"

#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct pv_dev {
    struct pv_ibv_context *ctx;
    void *pd;
    int port;
};

struct pv_conn {
    pv_dev *dev;
    struct pv_ibv_comp_channel *channel;
    struct pv_ibv_cq *cq;
    int nqp;
    int armed;
    struct pv_ibv_qp *qp[64];
};

static struct {
    void *lib;
    void **(*get_device_list)(int *);
    void (*free_device_list)(void **);
    const char *(*get_device_name)(void *);
    struct pv_ibv_context *(*open_device)(void *);
    int (*close_device)(struct pv_ibv_context *);
    int (*query_port)(struct pv_ibv_context *, uint8_t, struct pv_ibv_port_attr *);
    int (*query_gid)(struct pv_ibv_context *, uint8_t, int, union pv_ibv_gid *);
    void *(*alloc_pd)(struct pv_ibv_context *);
    int (*dealloc_pd)(void *);
    struct pv_ibv_mr *(*reg_mr)(void *, void *, size_t, int);
    int (*dereg_mr)(struct pv_ibv_mr *);
    struct pv_ibv_comp_channel *(*create_comp_channel)(struct pv_ibv_context *);
    int (*destroy_comp_channel)(struct pv_ibv_comp_channel *);
    struct pv_ibv_cq *(*create_cq)(struct pv_ibv_context *, int, void *, struct pv_ibv_comp_channel *, int);
    int (*destroy_cq)(struct pv_ibv_cq *);
    int (*get_cq_event)(struct pv_ibv_comp_channel *, struct pv_ibv_cq **, void **);
    void (*ack_cq_events)(struct pv_ibv_cq *, unsigned int);
    struct pv_ibv_qp *(*create_qp)(void *, struct pv_ibv_qp_init_attr *);
    int (*modify_qp)(struct pv_ibv_qp *, struct pv_ibv_qp_attr *, int);
    int (*query_qp)(struct pv_ibv_qp *, struct pv_ibv_qp_attr *, int, struct pv_ibv_qp_init_attr *);
    int (*destroy_qp)(struct pv_ibv_qp *);
    const char *(*wc_status_str)(int);
    int (*fork_init)(void);
} V;

static pthread_mutex_t load_lock = PTHREAD_MUTEX_INITIALIZER;

static void say(char *err, int errlen, const char *fmt, ...) {
    if (!err || errlen <= 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, (size_t)errlen, fmt, ap);
    va_end(ap);
}

static void *sym(const char *name) {
    void *p = NULL;
#ifdef __GLIBC__   /* glibc: prefer the current ABI of the symbols that kept a 1.0 twin */
    p = dlvsym(V.lib, name, "IBVERBS_1.1");
#endif
    return p ? p : dlsym(V.lib, name);
}

int pv_load(char *err, int errlen) {
    static int state = 0;             /* 0 untried, 1 loaded, -1 failed */
    static char why[256];
    pthread_mutex_lock(&load_lock);
    if (state == 0) {
        const char *names[] = {"libibverbs.so.1", "libibverbs.so"};
        for (int i = 0; i < 2 && !V.lib; i++)
            V.lib = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
        if (!V.lib) {
            const char *e = dlerror();
            snprintf(why, sizeof why, "libibverbs.so.1 not found (install rdma-core / libibverbs1): %s",
                     e ? e : "dlopen failed");
            state = -1;
        } else {
#define LOAD(field, name)                                                              \
    if (state == 0 && !(*(void **)&V.field = sym(name))) {                          \
        snprintf(why, sizeof why, "libibverbs.so.1 lacks %s (too old?)", name);     \
        state = -1;                                                                 \
    }
            LOAD(get_device_list, "ibv_get_device_list")
            LOAD(free_device_list, "ibv_free_device_list")
            LOAD(get_device_name, "ibv_get_device_name")
            LOAD(open_device, "ibv_open_device")
            LOAD(close_device, "ibv_close_device")
            LOAD(query_port, "ibv_query_port")
            LOAD(query_gid, "ibv_query_gid")
            LOAD(alloc_pd, "ibv_alloc_pd")
            LOAD(dealloc_pd, "ibv_dealloc_pd")
            LOAD(reg_mr, "ibv_reg_mr")
            LOAD(dereg_mr, "ibv_dereg_mr")
            LOAD(create_comp_channel, "ibv_create_comp_channel")
            LOAD(destroy_comp_channel, "ibv_destroy_comp_channel")
            LOAD(create_cq, "ibv_create_cq")
            LOAD(destroy_cq, "ibv_destroy_cq")
            LOAD(get_cq_event, "ibv_get_cq_event")
            LOAD(ack_cq_events, "ibv_ack_cq_events")
            LOAD(create_qp, "ibv_create_qp")
            LOAD(modify_qp, "ibv_modify_qp")
            LOAD(query_qp, "ibv_query_qp")
            LOAD(destroy_qp, "ibv_destroy_qp")
            LOAD(wc_status_str, "ibv_wc_status_str")
#undef LOAD
            *(void **)&V.fork_init = dlsym(V.lib, "ibv_fork_init");
            if (state == 0) {
                /* Registered memory must survive fork() (multiprocessing, subprocess):
                 * a no-op on kernels that copy pinned pages for the child themselves. */
                if (V.fork_init)
                    V.fork_init();
                state = 1;
            }
        }
    }
    int ok = state;
    pthread_mutex_unlock(&load_lock);
    if (ok < 0) {
        say(err, errlen, "%s", why);
        return -1;
    }
    return 0;
}

int pv_list_devices(char *names, int len, char *err, int errlen) {
    if (pv_load(err, errlen))
        return -1;
    int n = 0;
    void **list = V.get_device_list(&n);
    if (!list) {
        say(err, errlen, "ibv_get_device_list failed: %s", strerror(errno));
        return -1;
    }
    int used = 0;
    names[0] = 0;
    for (int i = 0; i < n; i++) {
        const char *nm = V.get_device_name(list[i]);
        int k = snprintf(names + used, (size_t)(len - used), "%s%s", i ? "," : "", nm ? nm : "?");
        if (k < 0 || used + k >= len)
            break;
        used += k;
    }
    V.free_device_list(list);
    return n;
}

pv_dev *pv_dev_open(const char *name, int port, char *err, int errlen) {
    if (pv_load(err, errlen))
        return NULL;
    int n = 0;
    void **list = V.get_device_list(&n);
    if (!list) {
        say(err, errlen, "ibv_get_device_list failed: %s", strerror(errno));
        return NULL;
    }
    void *found = NULL;
    for (int i = 0; i < n && !found; i++) {
        const char *nm = V.get_device_name(list[i]);
        if (nm && strcmp(nm, name) == 0)
            found = list[i];
    }
    if (!found) {
        V.free_device_list(list);
        say(err, errlen, "no RDMA device named %s (%d found)", name, n);
        return NULL;
    }
    struct pv_ibv_context *ctx = V.open_device(found);
    V.free_device_list(list);
    if (!ctx) {
        say(err, errlen, "ibv_open_device(%s) failed: %s", name, strerror(errno));
        return NULL;
    }
    void *pd = V.alloc_pd(ctx);
    if (!pd) {
        say(err, errlen, "ibv_alloc_pd(%s) failed: %s", name, strerror(errno));
        V.close_device(ctx);
        return NULL;
    }
    pv_dev *d = calloc(1, sizeof *d);
    if (!d) {
        V.dealloc_pd(pd);
        V.close_device(ctx);
        say(err, errlen, "out of memory");
        return NULL;
    }
    d->ctx = ctx;
    d->pd = pd;
    d->port = port;
    return d;
}

int pv_dev_port(pv_dev *d, struct pv_port *out, char *err, int errlen) {
    struct pv_ibv_port_attr a;
    memset(&a, 0, sizeof a);
    int rc = V.query_port(d->ctx, (uint8_t)d->port, &a);
    if (rc) {
        say(err, errlen, "ibv_query_port(port %d) failed: %s", d->port, strerror(rc > 0 ? rc : errno));
        return -1;
    }
    out->state = a.state;
    out->max_mtu = a.max_mtu;
    out->active_mtu = a.active_mtu;
    out->gid_tbl_len = a.gid_tbl_len;
    out->lid = a.lid;
    out->link_layer = a.link_layer;
    return 0;
}

int pv_dev_gid(pv_dev *d, int index, uint8_t *gid16, char *err, int errlen) {
    union pv_ibv_gid g;
    if (V.query_gid(d->ctx, (uint8_t)d->port, index, &g)) {
        say(err, errlen, "ibv_query_gid(port %d, index %d) failed: %s", d->port, index, strerror(errno));
        return -1;
    }
    memcpy(gid16, g.raw, 16);
    return 0;
}

void pv_dev_close(pv_dev *d) {
    if (!d)
        return;
    V.dealloc_pd(d->pd);
    V.close_device(d->ctx);
    free(d);
}

void *pv_reg_mr(pv_dev *d, void *addr, size_t len, int access, uint32_t *lkey, uint32_t *rkey,
                char *err, int errlen) {
    struct pv_ibv_mr *mr = V.reg_mr(d->pd, addr, len, access);
    if (!mr) {
        int e = errno;
        say(err, errlen, "ibv_reg_mr(%zu bytes at %p) failed: %s%s", len, addr, strerror(e),
            e == ENOMEM ? " (raise the locked-memory limit: ulimit -l unlimited)" : "");
        return NULL;
    }
    *lkey = mr->lkey;
    *rkey = mr->rkey;
    return mr;
}

int pv_dereg_mr(void *mr) {
    return mr ? V.dereg_mr((struct pv_ibv_mr *)mr) : 0;
}

pv_conn *pv_conn_create(pv_dev *d, int nqp, int sq_depth, int rq_depth, uint32_t *qpns,
                        char *err, int errlen) {
    if (nqp < 1 || nqp > 64) {
        say(err, errlen, "bad QP count %d (1..64)", nqp);
        return NULL;
    }
    pv_conn *c = calloc(1, sizeof *c);
    if (!c) {
        say(err, errlen, "out of memory");
        return NULL;
    }
    c->dev = d;
    c->channel = V.create_comp_channel(d->ctx);
    if (!c->channel) {
        say(err, errlen, "ibv_create_comp_channel failed: %s", strerror(errno));
        goto fail;
    }
    int fl = fcntl(c->channel->fd, F_GETFL);
    if (fl < 0 || fcntl(c->channel->fd, F_SETFL, fl | O_NONBLOCK) < 0) {
        say(err, errlen, "cannot make the completion channel non-blocking: %s", strerror(errno));
        goto fail;
    }
    c->cq = V.create_cq(d->ctx, nqp * (sq_depth + rq_depth) + 16, NULL, c->channel, 0);
    if (!c->cq) {
        say(err, errlen, "ibv_create_cq(%d entries) failed: %s", nqp * (sq_depth + rq_depth) + 16,
            strerror(errno));
        goto fail;
    }
    for (int i = 0; i < nqp; i++) {
        struct pv_ibv_qp_init_attr ia;
        memset(&ia, 0, sizeof ia);
        ia.send_cq = c->cq;
        ia.recv_cq = c->cq;
        ia.cap.max_send_wr = (uint32_t)sq_depth;
        ia.cap.max_recv_wr = (uint32_t)rq_depth;
        ia.cap.max_send_sge = 1;
        ia.cap.max_recv_sge = 1;
        ia.qp_type = PV_IBV_QPT_RC;
        c->qp[i] = V.create_qp(d->pd, &ia);
        if (!c->qp[i]) {
            say(err, errlen, "ibv_create_qp(RC, %d send / %d recv) failed: %s", sq_depth, rq_depth,
                strerror(errno));
            goto fail;
        }
        c->nqp = i + 1;
        struct pv_ibv_qp_attr a;
        memset(&a, 0, sizeof a);
        a.qp_state = PV_IBV_QPS_INIT;
        a.pkey_index = 0;
        a.port_num = (uint8_t)d->port;
        /* REMOTE_READ: one-sided windows read by RDMA READ (only memory registered for it) */
        a.qp_access_flags = PV_IBV_ACCESS_REMOTE_WRITE | PV_IBV_ACCESS_REMOTE_READ | PV_IBV_ACCESS_LOCAL_WRITE;
        int rc = V.modify_qp(c->qp[i], &a, PV_IBV_QP_STATE | PV_IBV_QP_PKEY_INDEX | PV_IBV_QP_PORT |
                                                PV_IBV_QP_ACCESS_FLAGS);
        if (rc) {
            say(err, errlen, "QP %d RESET->INIT failed: %s", i, strerror(rc > 0 ? rc : errno));
            goto fail;
        }
        qpns[i] = c->qp[i]->qp_num;
    }
    return c;
fail:
    pv_conn_destroy(c);
    return NULL;
}

int pv_conn_connect(pv_conn *c, int qi, uint32_t remote_qpn, uint32_t my_psn, uint32_t remote_psn,
                    const uint8_t *gid16, int lid, int sgid_index, int mtu, int timeout,
                    int retry_cnt, int rnr_retry, char *err, int errlen) {
    struct pv_ibv_qp_attr a;
    memset(&a, 0, sizeof a);
    a.qp_state = PV_IBV_QPS_RTR;
    a.path_mtu = mtu;
    a.dest_qp_num = remote_qpn;
    a.rq_psn = remote_psn & 0xffffff;
    a.max_dest_rd_atomic = 1;
    a.min_rnr_timer = 12;
    a.ah_attr.dlid = (uint16_t)lid;
    a.ah_attr.sl = 0;
    a.ah_attr.port_num = (uint8_t)c->dev->port;
    if (sgid_index >= 0) {       /* RoCE (and routed IB): address by GID through a GRH */
        a.ah_attr.is_global = 1;
        memcpy(a.ah_attr.grh.dgid.raw, gid16, 16);
        a.ah_attr.grh.sgid_index = (uint8_t)sgid_index;
        a.ah_attr.grh.hop_limit = 64;
    }
    int rc = V.modify_qp(c->qp[qi], &a, PV_IBV_QP_STATE | PV_IBV_QP_AV | PV_IBV_QP_PATH_MTU |
                                            PV_IBV_QP_DEST_QPN | PV_IBV_QP_RQ_PSN |
                                            PV_IBV_QP_MAX_DEST_RD_ATOMIC | PV_IBV_QP_MIN_RNR_TIMER);
    if (rc) {
        say(err, errlen, "QP %d INIT->RTR failed: %s", qi, strerror(rc > 0 ? rc : errno));
        return -1;
    }
    memset(&a, 0, sizeof a);
    a.qp_state = PV_IBV_QPS_RTS;
    a.timeout = (uint8_t)timeout;
    a.retry_cnt = (uint8_t)retry_cnt;
    a.rnr_retry = (uint8_t)rnr_retry;
    a.sq_psn = my_psn & 0xffffff;
    a.max_rd_atomic = 1;
    rc = V.modify_qp(c->qp[qi], &a, PV_IBV_QP_STATE | PV_IBV_QP_TIMEOUT | PV_IBV_QP_RETRY_CNT |
                                        PV_IBV_QP_RNR_RETRY | PV_IBV_QP_SQ_PSN |
                                        PV_IBV_QP_MAX_QP_RD_ATOMIC);
    if (rc) {
        say(err, errlen, "QP %d RTR->RTS failed: %s", qi, strerror(rc > 0 ? rc : errno));
        return -1;
    }
    return 0;
}

int pv_post_write(pv_conn *c, int qi, uint64_t wr_id, uint64_t laddr, uint32_t len, uint32_t lkey,
                  uint64_t raddr, uint32_t rkey, int with_imm, uint32_t imm) {
    struct pv_ibv_sge sge = {laddr, len, lkey};
    struct pv_ibv_send_wr wr;
    memset(&wr, 0, sizeof wr);
    wr.wr_id = wr_id;
    wr.sg_list = len ? &sge : NULL;
    wr.num_sge = len ? 1 : 0;
    wr.opcode = with_imm ? PV_IBV_WR_RDMA_WRITE_WITH_IMM : PV_IBV_WR_RDMA_WRITE;
    wr.send_flags = PV_IBV_SEND_SIGNALED;
    wr.imm_data = htonl(imm);
    wr.wr.rdma.remote_addr = raddr;
    wr.wr.rdma.rkey = rkey;
    void *bad = NULL;
    struct pv_ibv_qp *qp = c->qp[qi];
    return qp->context->ops.post_send(qp, &wr, &bad);
}

/* RDMA READ of len bytes at the peer's raddr (rkey) into laddr (lkey, LOCAL_WRITE), signaled. */
int pv_post_read(pv_conn *c, int qi, uint64_t wr_id, uint64_t laddr, uint32_t len, uint32_t lkey,
                 uint64_t raddr, uint32_t rkey) {
    struct pv_ibv_sge sge = {laddr, len, lkey};
    struct pv_ibv_send_wr wr;
    memset(&wr, 0, sizeof wr);
    wr.wr_id = wr_id;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.opcode = PV_IBV_WR_RDMA_READ;
    wr.send_flags = PV_IBV_SEND_SIGNALED;
    wr.wr.rdma.remote_addr = raddr;
    wr.wr.rdma.rkey = rkey;
    void *bad = NULL;
    struct pv_ibv_qp *qp = c->qp[qi];
    return qp->context->ops.post_send(qp, &wr, &bad);
}

int pv_post_recvs(pv_conn *c, int qi, uint64_t wr_id, int count) {
    struct pv_ibv_qp *qp = c->qp[qi];
    for (int i = 0; i < count; i++) {
        struct pv_ibv_recv_wr wr;
        memset(&wr, 0, sizeof wr);
        wr.wr_id = wr_id;
        wr.num_sge = 0;           /* RDMA WRITE with immediate only consumes the slot */
        void *bad = NULL;
        int rc = qp->context->ops.post_recv(qp, &wr, &bad);
        if (rc)
            return rc;
    }
    return 0;
}

int pv_poll(pv_conn *c, struct pv_wc *out, int max) {
    struct pv_ibv_wc wc[32];
    int total = 0;
    while (total < max) {
        int want = max - total < 32 ? max - total : 32;
        int n = c->cq->context->ops.poll_cq(c->cq, want, wc);
        if (n < 0)
            return n;
        for (int i = 0; i < n; i++) {
            struct pv_wc *o = &out[total + i];
            o->wr_id = wc[i].wr_id;
            o->status = (uint32_t)wc[i].status;
            o->opcode = (uint32_t)wc[i].opcode;
            o->imm = ntohl(wc[i].imm_data);
            o->byte_len = wc[i].byte_len;
            o->qp_num = wc[i].qp_num;
            o->vendor_err = wc[i].vendor_err;
        }
        total += n;
        if (n < want)
            break;
    }
    return total;
}

/* Ask for an event on the next completion; returns the channel's fd to select() on. */
int pv_arm(pv_conn *c) {
    if (!c->armed) {
        if (c->cq->context->ops.req_notify_cq(c->cq, 0))
            return -1;
        c->armed = 1;
    }
    return c->channel->fd;
}

/* Consume the channel's pending events without blocking; returns how many. */
int pv_drain_events(pv_conn *c) {
    int n = 0;
    struct pv_ibv_cq *cq;
    void *ctx;
    while (V.get_cq_event(c->channel, &cq, &ctx) == 0)
        n++;
    if (n) {
        V.ack_cq_events(c->cq, (unsigned int)n);
        c->armed = 0;
    }
    return n;
}

int pv_qp_state(pv_conn *c, int qi) {
    struct pv_ibv_qp_attr a;
    struct pv_ibv_qp_init_attr ia;
    if (V.query_qp(c->qp[qi], &a, PV_IBV_QP_STATE, &ia))
        return -1;
    return a.qp_state;
}

void pv_conn_destroy(pv_conn *c) {
    if (!c)
        return;
    for (int i = 0; i < c->nqp; i++)
        if (c->qp[i])
            V.destroy_qp(c->qp[i]);
    if (c->cq) {
        pv_drain_events(c);
        V.destroy_cq(c->cq);
    }
    if (c->channel)
        V.destroy_comp_channel(c->channel);
    free(c);
}

const char *pv_wc_status_str(int status) {
    return V.wc_status_str ? V.wc_status_str(status) : "unknown status";
}

#else   /* built as part of pyccl._native by native/build.py's *.c glob: nothing to add there */
typedef int pyccl_ibverbs_not_in_native;
#endif

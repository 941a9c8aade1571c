/* pyccl native core: shared-memory segments and the slot rings of the shm transport
 * (see shm.h for the contract, transports/shm.py for the user).  The node-local collectives
 * are shm_coll.c (a segment: set-up, failures, waits) and shm_coll_ops.c (one call: the
 * choice of stores, the algorithms); what the three files share is in shm_internal.h.
 */
#define _GNU_SOURCE
#include "shm_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define RING_MAGIC 0x31676e69726c6370ULL

/* ---- segments ------------------------------------------------------------------------- */

void *pyccl_shm_map(const char *name, size_t *size, int create, int *err) {
    int fd = create ? shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600) : shm_open(name, O_RDWR, 0);
    if (fd < 0) {
        *err = errno;
        return NULL;
    }
    if (create) {
        int rc = ftruncate(fd, (off_t)*size);
        if (rc == 0 && create == 1)
            rc = posix_fallocate(fd, 0, (off_t)*size); /* returns the error, not -1 */
        else
            rc = errno;
        if (rc != 0) {
            close(fd);
            shm_unlink(name);
            *err = rc;
            return NULL;
        }
    } else {
        struct stat st;
        if (fstat(fd, &st) != 0) {
            *err = errno;
            close(fd);
            return NULL;
        }
        *size = (size_t)st.st_size;
    }
    void *p = mmap(NULL, *size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    *err = p == MAP_FAILED ? errno : 0;
    close(fd); /* the mapping keeps the object alive */
    return p == MAP_FAILED ? NULL : p;
}

int pyccl_shm_unmap(void *base, size_t size) { return munmap(base, size) == 0 ? 0 : errno; }

int pyccl_shm_unlink(const char *name) { return shm_unlink(name) == 0 ? 0 : errno; }

int pyccl_pid_alive(int pid) {
    if (pid <= 0)
        return 1; /* unknown: never claim a death we cannot see */
    if (kill(pid, 0) != 0 && errno == ESRCH)
        return 0;
    /* A killed process stays a zombie until its parent reaps it; kill() still succeeds. */
    char path[64], buf[256];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return errno == ENOENT ? 0 : 1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    const char *rp = strrchr(buf, ')'); /* "pid (comm) S ..." ; comm may hold spaces */
    return !(rp && rp[1] == ' ' && (rp[2] == 'Z' || rp[2] == 'X'));
}
/* ---- slot rings --------------------------------------------------------------------------
 * Layout of one ring (it lives in the receiver's segment):
 *   line 0  geometry (written once by the receiver)
 *   line 1  head: slots written by the sender (only the sender writes it)
 *   line 2  tail: slots consumed by the receiver (only the receiver writes it)
 *   meta    nslots x {message length, message number, bytes in this slot, call} (sender-written)
 *   data    nslots x slot_bytes, page aligned */
typedef struct {
    uint64_t magic, slot_bytes, data_off;
    uint32_t nslots;
} ring_geom;

typedef struct {
    uint64_t v;
    uint32_t closed;
} ring_end;

typedef struct {
    uint64_t msg_len;
    uint32_t msg_no;
    uint32_t nbytes;
    uint64_t call;       /* the collective call the message belongs to (ccl/callsig.py); 0: unchecked */
} slot_meta;

#define GEOM(r) ((ring_geom *)(r))
#define SENDER(r) ((ring_end *)((char *)(r) + LINE))
#define RECEIVER(r) ((ring_end *)((char *)(r) + 2 * LINE))
#define META(r) ((slot_meta *)((char *)(r) + 3 * LINE))
#define SLOT(r, i) ((char *)(r) + GEOM(r)->data_off + (size_t)(i) * GEOM(r)->slot_bytes)

size_t pyccl_ring_bytes(uint64_t slot_bytes, uint32_t nslots) {
    return round_up(3 * LINE + nslots * sizeof(slot_meta), PAGE) + round_up(nslots * slot_bytes, PAGE);
}

void pyccl_ring_format(void *ring, uint64_t slot_bytes, uint32_t nslots) {
    memset(ring, 0, 3 * LINE + nslots * sizeof(slot_meta));
    GEOM(ring)->slot_bytes = slot_bytes;
    GEOM(ring)->nslots = nslots;
    GEOM(ring)->data_off = round_up(3 * LINE + nslots * sizeof(slot_meta), PAGE);
    STORE_REL(&GEOM(ring)->magic, RING_MAGIC);
}

uint64_t pyccl_ring_slot_bytes(void *ring) {
    return LOAD_ACQ(&GEOM(ring)->magic) == RING_MAGIC ? GEOM(ring)->slot_bytes : 0;
}

static uint64_t msg_slots(uint64_t len, uint64_t sb) { return len ? (len + sb - 1) / sb : 1; }

int64_t pyccl_ring_send(void *ring, const void *src, uint64_t len, uint64_t slot,
                        uint32_t msg_no, uint64_t call) {
    const uint64_t sb = GEOM(ring)->slot_bytes;
    const uint32_t ns = GEOM(ring)->nslots;
    const uint64_t total = msg_slots(len, sb);
    uint64_t head = LOAD_RLX(&SENDER(ring)->v);
    uint64_t tail = LOAD_ACQ(&RECEIVER(ring)->v);
    call_kind = pyccl_share_hint();
    while (slot < total) {
        if (head - tail >= ns) {
            tail = LOAD_ACQ(&RECEIVER(ring)->v);
            if (head - tail >= ns)
                break;
        }
        const uint64_t off = slot * sb;
        const uint64_t nb = len ? min_sz(sb, len - off) : 0;
        const uint32_t i = (uint32_t)(head % ns);
        if (nb)
            put_shared(SLOT(ring, i), (const char *)src + off, nb);
        META(ring)[i].msg_len = len;
        META(ring)[i].msg_no = msg_no;
        META(ring)[i].nbytes = (uint32_t)nb;
        META(ring)[i].call = call;
        STORE_REL(&SENDER(ring)->v, ++head);
        slot++;
    }
    call_kind = 0;
    return (int64_t)slot;
}

int64_t pyccl_ring_recv(void *ring, void *dst, const void *red, uint64_t len, uint64_t slot,
                        uint32_t msg_no, uint64_t call, int dtype, int op) {
    const uint64_t sb = GEOM(ring)->slot_bytes;
    const uint32_t ns = GEOM(ring)->nslots;
    const uint64_t total = msg_slots(len, sb);
    uint64_t tail = LOAD_RLX(&RECEIVER(ring)->v);
    uint64_t head = LOAD_ACQ(&SENDER(ring)->v);
    while (slot < total) {
        if (tail == head) {
            head = LOAD_ACQ(&SENDER(ring)->v);
            if (tail == head)
                break;
        }
        const uint32_t i = (uint32_t)(tail % ns);
        const slot_meta m = META(ring)[i];
        if (m.msg_no != msg_no)
            return -PYCCL_SHM_OUT_OF_STEP;
        if (call && m.call && m.call != call)
            return -PYCCL_SHM_CALL_MISMATCH;
        if (m.msg_len != len)
            return -PYCCL_SHM_SIZE_MISMATCH;
        const uint64_t off = slot * sb;
        if (m.nbytes) {
            if (red)
                pyccl_reduce((char *)dst + off, (const char *)red + off, SLOT(ring, i),
                             m.nbytes / itemsize(dtype), dtype, op);
            else
                memcpy((char *)dst + off, SLOT(ring, i), m.nbytes);
        }
        STORE_REL(&RECEIVER(ring)->v, ++tail);
        slot++;
    }
    return (int64_t)slot;
}

int pyccl_ring_peek(void *ring, uint64_t *len, uint32_t *msg_no, uint64_t *call) {
    uint64_t tail = LOAD_RLX(&RECEIVER(ring)->v);
    if (tail == LOAD_ACQ(&SENDER(ring)->v))
        return 0;
    const slot_meta *m = &META(ring)[tail % GEOM(ring)->nslots];
    *len = m->msg_len;
    *msg_no = m->msg_no;
    *call = m->call;
    return 1;
}

void pyccl_ring_close(void *ring, int receiver, uint32_t how) {
    STORE_REL(&(receiver ? RECEIVER(ring) : SENDER(ring))->closed, how);
}

int pyccl_ring_peer_closed(void *ring, int receiver) {
    return (int)LOAD_ACQ(&(receiver ? SENDER(ring) : RECEIVER(ring))->closed);
}

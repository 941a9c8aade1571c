/* pyccl ibverbs core: a thin layer over libibverbs, loaded with dlopen at run time.
 *
 * No rdma-core header is needed to build this: the few verbs structures pyccl touches are
 * declared below with a "pv_" prefix, copied from the stable libibverbs ABI (the same
 * layouts that the inline functions of <infiniband/verbs.h> compile into every verbs
 * program, so they cannot change without breaking all of them; NCCL's ibvcore.h does the
 * same).  tests/rdma/test_ibverbs.py compiles these declarations next to the real header,
 * when it is installed, and checks every offset and size used here.
 *
 * Everything returns 0 / a pointer on success and -1 / NULL on failure with a message in
 * the caller's `err` buffer; nothing here aborts or prints.
 */
#ifndef PYCCL_IBVERBS_H
#define PYCCL_IBVERBS_H

#include <stddef.h>
#include <stdint.h>
#include <pthread.h>

/* ---- libibverbs ABI (prefix pv_ibv_ for ibv_) ------------------------------------------ */
union pv_ibv_gid {
    uint8_t raw[16];
    struct { uint64_t subnet_prefix; uint64_t interface_id; } global;
};

struct pv_ibv_context;

struct pv_ibv_context_ops {                 /* 32 function pointers; pyccl calls four */
    void *_pad0[11];
    int (*poll_cq)(void *cq, int num_entries, void *wc);                     /* [11] */
    int (*req_notify_cq)(void *cq, int solicited_only);                      /* [12] */
    void *_pad1[12];
    int (*post_send)(void *qp, void *wr, void **bad_wr);                     /* [25] */
    int (*post_recv)(void *qp, void *wr, void **bad_wr);                     /* [26] */
    void *_pad2[5];
};

struct pv_ibv_context {
    void *device;
    struct pv_ibv_context_ops ops;
    int cmd_fd;
    int async_fd;
    int num_comp_vectors;
    pthread_mutex_t mutex;
    void *abi_compat;
};

struct pv_ibv_comp_channel {
    struct pv_ibv_context *context;
    int fd;
    int refcnt;
};

struct pv_ibv_cq {
    struct pv_ibv_context *context;
    struct pv_ibv_comp_channel *channel;
    void *cq_context;
    uint32_t handle;
    int cqe;
    /* mutex, cond, counters follow: never touched here */
};

struct pv_ibv_qp {
    struct pv_ibv_context *context;
    void *qp_context;
    void *pd;
    struct pv_ibv_cq *send_cq;
    struct pv_ibv_cq *recv_cq;
    void *srq;
    uint32_t handle;
    uint32_t qp_num;
    int state;
    int qp_type;
    /* mutex, cond, events_completed follow */
};

struct pv_ibv_mr {
    struct pv_ibv_context *context;
    void *pd;
    void *addr;
    size_t length;
    uint32_t handle;
    uint32_t lkey;
    uint32_t rkey;
};

struct pv_ibv_port_attr {                   /* the full struct; libibverbs fills a prefix */
    int state;
    int max_mtu;
    int active_mtu;
    int gid_tbl_len;
    uint32_t port_cap_flags;
    uint32_t max_msg_sz;
    uint32_t bad_pkey_cntr;
    uint32_t qkey_viol_cntr;
    uint16_t pkey_tbl_len;
    uint16_t lid;
    uint16_t sm_lid;
    uint8_t lmc;
    uint8_t max_vl_num;
    uint8_t sm_sl;
    uint8_t subnet_timeout;
    uint8_t init_type_reply;
    uint8_t active_width;
    uint8_t active_speed;
    uint8_t phys_state;
    uint8_t link_layer;
    uint8_t flags;
    uint16_t port_cap_flags2;
    uint32_t _spare[8];                     /* room should a newer library write more */
};

struct pv_ibv_wc {
    uint64_t wr_id;
    int status;
    int opcode;
    uint32_t vendor_err;
    uint32_t byte_len;
    uint32_t imm_data;                      /* network byte order */
    uint32_t qp_num;
    uint32_t src_qp;
    unsigned int wc_flags;
    uint16_t pkey_index;
    uint16_t slid;
    uint8_t sl;
    uint8_t dlid_path_bits;
};

struct pv_ibv_sge {
    uint64_t addr;
    uint32_t length;
    uint32_t lkey;
};

struct pv_ibv_send_wr {
    uint64_t wr_id;
    struct pv_ibv_send_wr *next;
    struct pv_ibv_sge *sg_list;
    int num_sge;
    int opcode;
    unsigned int send_flags;
    uint32_t imm_data;                      /* network byte order */
    union {
        struct { uint64_t remote_addr; uint32_t rkey; } rdma;
        struct { uint64_t remote_addr; uint64_t compare_add; uint64_t swap; uint32_t rkey; } atomic;
        struct { void *ah; uint32_t remote_qpn; uint32_t remote_qkey; } ud;
    } wr;
    union { struct { uint32_t remote_srqn; } xrc; } qp_type;
    union {                                 /* bind_mw / tso: unused, kept for the size */
        struct { void *mw; uint32_t rkey; void *mr; uint64_t addr; uint64_t length;
                 unsigned int mw_access_flags; } bind_mw;
        struct { void *hdr; uint16_t hdr_sz; uint16_t mss; } tso;
    } _tail;
};

struct pv_ibv_recv_wr {
    uint64_t wr_id;
    struct pv_ibv_recv_wr *next;
    struct pv_ibv_sge *sg_list;
    int num_sge;
};

struct pv_ibv_qp_cap {
    uint32_t max_send_wr;
    uint32_t max_recv_wr;
    uint32_t max_send_sge;
    uint32_t max_recv_sge;
    uint32_t max_inline_data;
};

struct pv_ibv_qp_init_attr {
    void *qp_context;
    struct pv_ibv_cq *send_cq;
    struct pv_ibv_cq *recv_cq;
    void *srq;
    struct pv_ibv_qp_cap cap;
    int qp_type;
    int sq_sig_all;
};

struct pv_ibv_global_route {
    union pv_ibv_gid dgid;
    uint32_t flow_label;
    uint8_t sgid_index;
    uint8_t hop_limit;
    uint8_t traffic_class;
};

struct pv_ibv_ah_attr {
    struct pv_ibv_global_route grh;
    uint16_t dlid;
    uint8_t sl;
    uint8_t src_path_bits;
    uint8_t static_rate;
    uint8_t is_global;
    uint8_t port_num;
};

struct pv_ibv_qp_attr {
    int qp_state;
    int cur_qp_state;
    int path_mtu;
    int path_mig_state;
    uint32_t qkey;
    uint32_t rq_psn;
    uint32_t sq_psn;
    uint32_t dest_qp_num;
    unsigned int qp_access_flags;
    struct pv_ibv_qp_cap cap;
    struct pv_ibv_ah_attr ah_attr;
    struct pv_ibv_ah_attr alt_ah_attr;
    uint16_t pkey_index;
    uint16_t alt_pkey_index;
    uint8_t en_sqd_async_notify;
    uint8_t sq_draining;
    uint8_t max_rd_atomic;
    uint8_t max_dest_rd_atomic;
    uint8_t min_rnr_timer;
    uint8_t port_num;
    uint8_t timeout;
    uint8_t retry_cnt;
    uint8_t rnr_retry;
    uint8_t alt_port_num;
    uint8_t alt_timeout;
    uint32_t rate_limit;
};

/* enum values from <infiniband/verbs.h> */
#define PV_IBV_QPT_RC 2
#define PV_IBV_QPS_RESET 0
#define PV_IBV_QPS_INIT 1
#define PV_IBV_QPS_RTR 2
#define PV_IBV_QPS_RTS 3
#define PV_IBV_QPS_ERR 6
#define PV_IBV_WR_RDMA_WRITE 0
#define PV_IBV_WR_RDMA_WRITE_WITH_IMM 1
#define PV_IBV_WR_RDMA_READ 4
#define PV_IBV_SEND_SIGNALED 2
#define PV_IBV_ACCESS_LOCAL_WRITE 1
#define PV_IBV_ACCESS_REMOTE_WRITE 2
#define PV_IBV_ACCESS_REMOTE_READ 4
#define PV_IBV_QP_STATE (1 << 0)
#define PV_IBV_QP_ACCESS_FLAGS (1 << 3)
#define PV_IBV_QP_PKEY_INDEX (1 << 4)
#define PV_IBV_QP_PORT (1 << 5)
#define PV_IBV_QP_AV (1 << 7)
#define PV_IBV_QP_PATH_MTU (1 << 8)
#define PV_IBV_QP_TIMEOUT (1 << 9)
#define PV_IBV_QP_RETRY_CNT (1 << 10)
#define PV_IBV_QP_RNR_RETRY (1 << 11)
#define PV_IBV_QP_RQ_PSN (1 << 12)
#define PV_IBV_QP_MAX_QP_RD_ATOMIC (1 << 13)
#define PV_IBV_QP_MIN_RNR_TIMER (1 << 15)
#define PV_IBV_QP_SQ_PSN (1 << 16)
#define PV_IBV_QP_MAX_DEST_RD_ATOMIC (1 << 17)
#define PV_IBV_QP_DEST_QPN (1 << 20)
#define PV_IBV_WC_RECV_RDMA_WITH_IMM 129
#define PV_IBV_LINK_LAYER_ETHERNET 2

/* ---- pyccl's interface (cffi cdef in native/build_verbs.py) ---------------------------- */
typedef struct pv_dev pv_dev;     /* one opened device port + protection domain */
typedef struct pv_conn pv_conn;   /* one peer: a completion queue (+channel) and its QPs */

struct pv_port {
    int state, max_mtu, active_mtu, gid_tbl_len, lid, link_layer;
};

struct pv_wc {                    /* a completion, flattened for Python */
    uint64_t wr_id;
    uint32_t status, opcode, imm, byte_len, qp_num, vendor_err;
};

int pv_load(char *err, int errlen);
int pv_list_devices(char *names, int len, char *err, int errlen);
pv_dev *pv_dev_open(const char *name, int port, char *err, int errlen);
int pv_dev_port(pv_dev *d, struct pv_port *out, char *err, int errlen);
int pv_dev_gid(pv_dev *d, int index, uint8_t *gid16, char *err, int errlen);
void pv_dev_close(pv_dev *d);
void *pv_reg_mr(pv_dev *d, void *addr, size_t len, int access, uint32_t *lkey, uint32_t *rkey,
                char *err, int errlen);
int pv_dereg_mr(void *mr);
pv_conn *pv_conn_create(pv_dev *d, int nqp, int sq_depth, int rq_depth, uint32_t *qpns,
                        char *err, int errlen);
int pv_conn_connect(pv_conn *c, int qi, uint32_t remote_qpn, uint32_t my_psn, uint32_t remote_psn,
                    const uint8_t *gid16, int lid, int sgid_index, int mtu, int timeout,
                    int retry_cnt, int rnr_retry, char *err, int errlen);
int pv_post_write(pv_conn *c, int qi, uint64_t wr_id, uint64_t laddr, uint32_t len, uint32_t lkey,
                  uint64_t raddr, uint32_t rkey, int with_imm, uint32_t imm);
int pv_post_read(pv_conn *c, int qi, uint64_t wr_id, uint64_t laddr, uint32_t len, uint32_t lkey,
                 uint64_t raddr, uint32_t rkey);
int pv_post_recvs(pv_conn *c, int qi, uint64_t wr_id, int count);
int pv_poll(pv_conn *c, struct pv_wc *out, int max);
int pv_arm(pv_conn *c);
int pv_drain_events(pv_conn *c);
int pv_qp_state(pv_conn *c, int qi);
void pv_conn_destroy(pv_conn *c);
const char *pv_wc_status_str(int status);

#endif

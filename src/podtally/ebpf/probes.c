// podtally ebpf-agent: TLS plaintext from OpenSSL (uprobes) and TCP connects (a tracepoint).
//
// Compiled by bcc at start-up with:
//   RINGBUF_PAGES  ring buffer size in pages (a power of two); when it is full, events are
//                  dropped and counted in `lost`, never waited for
//   PROXY_UID      the podtally sidecar's uid: its plaintext is what the sidecar meters
//   CGROUP_FILTER  1: only tasks under the cgroup in `scope[0]` are traced
//   WAKE_BYTES     wake user space once this many bytes were queued since the last wake-up
//
// No wake-up per event (BPF_RB_NO_WAKEUP), so neither the traced thread nor the agent pays
// for one: user space drains the ring buffer on a slow timer, and the record that brings
// what was queued since the last wake-up to WAKE_BYTES (a quarter of the ring) wakes it
// (BPF_RB_FORCE_WAKEUP). A burst is drained long before the ring is full; an idle node
// costs one wake-up per timer tick.
//
// Everything is bounded: one ring buffer, hash maps with fixed maximum sizes, a per-CPU
// scratch event, and at most MAX_PIECES * MAX_CHUNK bytes copied per SSL call (the rest is
// counted as truncated). A full map or ring buffer loses data, never blocks the caller.
#include <uapi/linux/ptrace.h>
#include <linux/sched.h>
#include <linux/in.h>
#include <linux/socket.h>
#include <net/tcp_states.h>

#define MAX_CHUNK 16384
#define MAX_PIECES 8

enum kind { K_WRITE = 1, K_READ = 2, K_CLOSE = 3, K_CONNECT = 4, K_TRUNC = 5, K_ARGS = 6 };

struct data_event {
    u8 kind;
    u8 _pad[3];
    u32 pid;
    u32 tid;
    u32 uid;
    u64 conn;      // the SSL* pointer: one TLS connection within pid
    u64 ts;        // CLOCK_MONOTONIC ns
    u64 cgroup;    // cgroup v2 id
    u32 len;       // bytes of data in this piece
    u32 total;     // bytes the SSL call moved
    u32 offset;    // of this piece within the call
    char comm[16];
    u8 data[MAX_CHUNK];
};

struct connect_event {
    u8 kind;
    u8 family;
    u16 dport;
    u32 pid;
    u32 tid;
    u32 uid;
    u64 cookie;
    u64 ts;
    u64 cgroup;
    u8 daddr[16];
    char comm[16];
};

struct call_args {
    u64 conn;
    u64 buf;
    u64 nbytes_ptr;  // SSL_*_ex: where the byte count is written; 0 for SSL_read/SSL_write
};

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_PERCPU_ARRAY(scratch, struct data_event, 1);
BPF_HASH(write_args, u64, struct call_args, 16384);
BPF_HASH(read_args, u64, struct call_args, 16384);
// Per event kind: events dropped because the ring buffer was full (or a map was).
BPF_PERCPU_ARRAY(lost, u64, 8);
// cgroup ids whose plaintext is never wanted (pods with a sidecar): set by user space.
BPF_HASH(skip_cgroups, u64, u8, 65536);
BPF_CGROUP_ARRAY(scope, 1);
// TLS connections user space has seen are not LLM calls (a request to another host, or
// HTTP/2): their plaintext is no longer copied. LRU: bounded, the oldest go first; SSL_free
// removes a connection's entry, since its SSL* may be reused for the next one.
struct conn_key {
    u64 ssl;
    u32 pid;
    u32 _pad;
};
BPF_TABLE("lru_hash", struct conn_key, u8, ignored_conns, 65536);
// Bytes queued since the last forced wake-up. Approximate under races (a reset may drop a
// concurrent add, two CPUs may both wake): at worst a record's size late, or a spare wake.
BPF_ARRAY(unwoken, u64, 1);

static __always_inline void count_lost(u32 kind) {
    u64 *n = lost.lookup(&kind);
    if (n) (*n)++;
}

// The ring-buffer flag for a record of `size` bytes: wake user space only when enough is
// queued (the kernel's record header and alignment counted as in the ring).
static __always_inline u64 wake_flag(u64 size) {
    u32 zero = 0;
    u64 *n = unwoken.lookup(&zero);
    if (!n) return BPF_RB_NO_WAKEUP;
    __sync_fetch_and_add(n, (size + 8 + 7) & ~7ULL);
    if (*n < WAKE_BYTES) return BPF_RB_NO_WAKEUP;
    *n = 0;
    return BPF_RB_FORCE_WAKEUP;
}

static __always_inline int wanted(void) {
#if CGROUP_FILTER
    if (scope.check_current_task(0) != 1) return 0;
#endif
    u32 uid = bpf_get_current_uid_gid();
    if (uid == PROXY_UID) return 0;
    u64 cg = bpf_get_current_cgroup_id();
    if (skip_cgroups.lookup(&cg)) return 0;
    return 1;
}

static __always_inline int enter(struct pt_regs *ctx, int is_write, int ex) {
    if (!wanted()) return 0;
    u64 id = bpf_get_current_pid_tgid();
    struct conn_key key = {};
    key.ssl = PT_REGS_PARM1(ctx);
    key.pid = id >> 32;
    if (ignored_conns.lookup(&key)) return 0;
    struct call_args a = {};
    a.conn = PT_REGS_PARM1(ctx);
    a.buf = PT_REGS_PARM2(ctx);
    a.nbytes_ptr = ex ? PT_REGS_PARM4(ctx) : 0;
    int err = is_write ? write_args.insert(&id, &a) : read_args.insert(&id, &a);
    // -EEXIST: a nested call (SSL_write inside SSL_write_ex); the outer one reports.
    if (err && err != -17) count_lost(K_ARGS);
    return 0;
}

static __always_inline int leave(struct pt_regs *ctx, int is_write) {
    u64 id = bpf_get_current_pid_tgid();
    struct call_args *a = is_write ? write_args.lookup(&id) : read_args.lookup(&id);
    if (!a) return 0;
    struct call_args args = *a;
    if (is_write) write_args.delete(&id); else read_args.delete(&id);

    long ret = PT_REGS_RC(ctx);
    u64 total = 0;
    if (args.nbytes_ptr) {
        if (ret != 1) return 0;
        bpf_probe_read_user(&total, sizeof(total), (void *)args.nbytes_ptr);
    } else {
        if (ret <= 0) return 0;
        total = ret;
    }
    if (total == 0) return 0;

    u32 zero = 0;
    struct data_event *ev = scratch.lookup(&zero);
    if (!ev) return 0;
    ev->kind = is_write ? K_WRITE : K_READ;
    ev->pid = id >> 32;
    ev->tid = (u32)id;
    ev->uid = bpf_get_current_uid_gid();
    ev->conn = args.conn;
    ev->ts = bpf_ktime_get_ns();
    ev->cgroup = bpf_get_current_cgroup_id();
    ev->total = total > 0xffffffff ? 0xffffffff : total;
    bpf_get_current_comm(&ev->comm, sizeof(ev->comm));

#pragma unroll
    for (int i = 0; i < MAX_PIECES; i++) {
        u64 off = (u64)i * MAX_CHUNK;
        if (off >= total) break;
        u64 n = total - off;
        if (n > MAX_CHUNK) n = MAX_CHUNK;
        ev->offset = off;
        ev->len = n;
        if (bpf_probe_read_user(&ev->data, n, (void *)(args.buf + off)) != 0) ev->len = 0;
        u64 size = offsetof(struct data_event, data) + n;
        if (events.ringbuf_output(ev, size, wake_flag(size)) != 0)
            count_lost(ev->kind);
    }
    if (total > (u64)MAX_PIECES * MAX_CHUNK) {
        // Tell user space the stream lost bytes here: its parser for this connection stops.
        ev->kind = K_TRUNC;
        ev->offset = (u64)MAX_PIECES * MAX_CHUNK;
        ev->len = 0;
        u64 size = offsetof(struct data_event, data);
        if (events.ringbuf_output(ev, size, wake_flag(size)) != 0)
            count_lost(K_TRUNC);
    }
    return 0;
}

int pt_write_enter(struct pt_regs *ctx) { return enter(ctx, 1, 0); }
int pt_write_ex_enter(struct pt_regs *ctx) { return enter(ctx, 1, 1); }
int pt_read_enter(struct pt_regs *ctx) { return enter(ctx, 0, 0); }
int pt_read_ex_enter(struct pt_regs *ctx) { return enter(ctx, 0, 1); }
int pt_write_leave(struct pt_regs *ctx) { return leave(ctx, 1); }
int pt_read_leave(struct pt_regs *ctx) { return leave(ctx, 0); }

// SSL_free: the connection's state in user space can go.
int pt_free_enter(struct pt_regs *ctx) {
    if (!wanted()) return 0;
    u32 zero = 0;
    struct data_event *ev = scratch.lookup(&zero);
    if (!ev) return 0;
    u64 id = bpf_get_current_pid_tgid();
    struct conn_key key = {};
    key.ssl = PT_REGS_PARM1(ctx);
    key.pid = id >> 32;
    ignored_conns.delete(&key);
    ev->kind = K_CLOSE;
    ev->pid = id >> 32;
    ev->tid = (u32)id;
    ev->uid = bpf_get_current_uid_gid();
    ev->conn = PT_REGS_PARM1(ctx);
    ev->ts = bpf_ktime_get_ns();
    ev->cgroup = bpf_get_current_cgroup_id();
    ev->len = ev->total = ev->offset = 0;
    bpf_get_current_comm(&ev->comm, sizeof(ev->comm));
    u64 size = offsetof(struct data_event, data);
    if (events.ringbuf_output(ev, size, wake_flag(size)) != 0)
        count_lost(K_CLOSE);
    return 0;
}

// A TCP connect leaves CLOSE for SYN_SENT in the connecting task's context. The destination
// is the socket's own (before any NAT): what the app asked for. User space decides whether
// it is an LLM endpoint; the kernel side only keeps TCP.
TRACEPOINT_PROBE(sock, inet_sock_set_state) {
    if (args->protocol != IPPROTO_TCP || args->newstate != TCP_SYN_SENT) return 0;
#if CGROUP_FILTER
    if (scope.check_current_task(0) != 1) return 0;
#endif
    struct connect_event ev = {};
    u64 id = bpf_get_current_pid_tgid();
    ev.kind = K_CONNECT;
    ev.family = args->family == AF_INET6 ? 6 : 4;
    ev.dport = args->dport;
    ev.pid = id >> 32;
    ev.tid = (u32)id;
    ev.uid = bpf_get_current_uid_gid();
    ev.cookie = (u64)args->skaddr;
    ev.ts = bpf_ktime_get_ns();
    ev.cgroup = bpf_get_current_cgroup_id();
    if (ev.family == 4)
        __builtin_memcpy(ev.daddr, args->daddr, 4);
    else
        __builtin_memcpy(ev.daddr, args->daddr_v6, 16);
    bpf_get_current_comm(&ev.comm, sizeof(ev.comm));
    if (events.ringbuf_output(&ev, sizeof(ev), wake_flag(sizeof(ev))) != 0)
        count_lost(K_CONNECT);
    return 0;
}

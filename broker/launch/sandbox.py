"""Dropping everything the broker does not need, in an order that cannot be undone.

``drop_privileges`` runs as root in the launcher's child just before it
executes the broker (sealbus_t may hold no capability, so the broker could not
do it itself under SELinux): lock the securebits, clear the ambient, bounding
and inheritable capability sets, switch to the bus user
(setgroups/setresgid/setresuid), clear permitted and effective, set
no_new_privs. The broker then repeats the unprivileged part (no_new_privs,
the parent-death signal, non-dumpable; exec resets both) and, before any
client data is touched, applies Landlock (no filesystem access but the
documented exceptions) and a seccomp allowlist that kills on anything else.
"""

import ctypes
import errno
import functools
import logging
import operator
import os
import signal

log = logging.getLogger("sealbus.sandbox")

PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_libc = ctypes.CDLL(None, use_errno=True)


class SandboxError(RuntimeError):
    pass


def drop_privileges(uid: int, gid: int) -> None:
    import prctl

    if os.getuid() == 0 or os.geteuid() == 0:
        # securebits first: no root magic, no fixups, no keep-caps, all locked
        prctl.securebits.noroot = True
        prctl.securebits.noroot_locked = True
        prctl.securebits.no_setuid_fixup = True
        prctl.securebits.no_setuid_fixup_locked = True
        prctl.securebits.keep_caps = False
        prctl.securebits.keep_caps_locked = True
        if _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
            e = ctypes.get_errno()
            if e != errno.EINVAL:  # kernels without ambient capabilities
                raise SandboxError(f"cannot clear ambient capabilities: {os.strerror(e)}")
        prctl.capbset.limit()  # bounding set: nothing (needs CAP_SETPCAP, so before setresuid)
        prctl.cap_inheritable.limit()
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    prctl.cap_effective.limit()
    prctl.cap_permitted.limit()
    prctl.set_no_new_privs(1)
    prctl.set_pdeathsig(signal.SIGTERM)
    prctl.set_dumpable(False)
    if os.getuid() != uid and uid >= 0:
        raise SandboxError("still not the bus user")


# With SELinux enabled the broker asks the kernel for dbus-class decisions
# (libselinux's AVC writes queries to selinuxfs "access" and reads "status",
# "enforce" and "class/"): the one path it may use, read/write, no creation.
SELINUXFS = "/sys/fs/selinux"


def _best_effort(what: str, without: str, required: bool, install) -> bool:
    """Install one sandbox layer; where the kernel lacks it, fail if required, else warn loudly."""
    try:
        install()
        return True
    except Exception as e:
        if required:
            raise SandboxError(f"{what} is required by the config but unavailable: {e}") from None
        log.warning("!!! %s unavailable (%s): the broker runs WITHOUT %s", what, e, without)
        return False


def apply_landlock(required: bool, selinuxfs: bool = False, payload_fs: str | None = None,
                   payload_store_fd: int | None = None) -> bool:  # fmt: skip
    """A ruleset that handles every filesystem right and allows none, except: selinuxfs when mediating,
    reading the broker's own /proc/self/fdinfo entries (to tell which fds' close() may block), and
    opening + unlinking its own snapshot files beneath the payload fs's parent directory (the rule
    is set on the parent: looking up the mount itself would wait for the FUSE server, which is us), and
    making, writing and reading unlinked files (O_TMPFILE) in the payload store's directory fd."""

    from ..payload.vet import classifier

    # Telling whether an fd's close() may block reads /proc/self/fdinfo/N (its mount): the directory is
    # opened (and so pinned) now and only reading beneath it is granted; mountinfo stays open.
    classifier.prepare()
    rules = []
    if classifier.fdinfo_dir >= 0:
        rules.append((f"/proc/self/fd/{classifier.fdinfo_dir}", ("READ_FILE",)))
    if selinuxfs:
        rules.append((SELINUXFS, ("READ_FILE", "WRITE_FILE", "READ_DIR")))
    if payload_fs:
        rules.append((os.path.dirname(os.path.abspath(payload_fs)), ("READ_FILE", "REMOVE_FILE")))
    if payload_store_fd is not None:
        rules.append((f"/proc/self/fd/{payload_store_fd}", ("MAKE_REG", "READ_FILE", "WRITE_FILE", "TRUNCATE")))
    holder = {}

    def install():
        import landlock

        holder["rs"] = landlock.Ruleset()  # fails only where the kernel lacks Landlock

    if not _best_effort("Landlock", "a filesystem sandbox", required, install):
        return False
    from landlock.plumbing import FSAccess

    rs = holder["rs"]
    # Only rights this kernel's Landlock ABI handles: a rule naming another (TRUNCATE before ABI 3, as on
    # Debian 12's 6.1) is EINVAL; a right the ruleset does not handle stays unrestricted, as Landlock defines.
    handled = FSAccess.all()
    for path, rights in rules:  # a path the bus user cannot reach is a configuration error, not "no Landlock"
        try:
            access = functools.reduce(operator.or_, (getattr(FSAccess, r) for r in rights)) & handled
            rs.allow(path, rules=access)
        except OSError as e:
            raise SandboxError(
                f"cannot grant the broker {path} ({e.strerror}): the bus user must be able to "
                "reach it (for the payload fs: a directory every user can search)"
            ) from None
    rs.apply()
    return True


# Everything the broker uses after the filter is installed: the trio loop
# (epoll, eventfd, pipes), sockets it was handed (accept4, recvmsg/sendmsg with
# SCM_RIGHTS, getsockopt for peer credentials), fd vetting (fstat/statx,
# fcntl F_GET_SEALS, ioctl FIONREAD), memory management, worker threads
# (clone with CLONE_THREAD only, futex, rseq) and clean exit. Not listed, so
# fatal: execve/execveat, ptrace, fork, socket/connect/bind, mount, setns,
# unshare, bpf, keyctl, open_by_handle_at, process_vm_*, kexec, modules...
ALLOWED_SYSCALLS = """
read write readv writev pread64 pwrite64 close close_range dup dup2 dup3 fcntl ioctl lseek
fstat newfstatat statx stat lstat
recvmsg sendmsg recvfrom sendto recvmmsg sendmmsg accept accept4 shutdown getsockopt setsockopt
getsockname getpeername socketpair
epoll_create1 epoll_ctl epoll_wait epoll_pwait epoll_pwait2 poll ppoll select pselect6 eventfd2 pipe2
mmap munmap mremap mprotect madvise brk msync
futex futex_waitv set_robust_list get_robust_list rseq sched_yield sched_getaffinity nanosleep clock_nanosleep
clock_gettime clock_getres gettimeofday time getrandom
rt_sigaction rt_sigprocmask rt_sigreturn sigaltstack rt_sigtimedwait tgkill gettid getpid getppid
getuid geteuid getgid getegid getgroups getresuid getresgid prctl capget
set_tid_address arch_prctl exit exit_group restart_syscall
getrlimit prlimit64 getcwd uname sysinfo
splice tee memfd_create ftruncate fallocate
openat open readlinkat unlink unlinkat getdents64
""".split()


def seccomp_module():
    """The libseccomp binding: pyseccomp (PyPI, ctypes) or, where only the distribution's is installed
    (Fedora/RHEL python3-libseccomp, Debian python3-seccomp), libseccomp's own ``seccomp``: one API."""
    try:
        import pyseccomp as sc
    except ImportError:
        import seccomp as sc
    return sc


def apply_seccomp(required: bool, extra: tuple[str, ...] = ()) -> bool:
    def install():
        sc = seccomp_module()

        f = sc.SyscallFilter(defaction=sc.KILL_PROCESS)
        for name in (*ALLOWED_SYSCALLS, *extra):
            try:
                f.add_rule(sc.ALLOW, name)
            except Exception:
                pass  # not a syscall on this architecture
        CLONE_THREAD = 0x00010000
        f.add_rule(sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, CLONE_THREAD))
        f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")  # its flags are behind a pointer: make glibc use clone
        f.load()

    return _best_effort("seccomp", "a syscall filter", required, install)

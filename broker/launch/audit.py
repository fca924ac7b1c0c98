"""The launcher's USER_AVC writer: it lives in ``broker.access.audit`` (the access
layer writes audit records; the launcher, above it, only uses them)."""

from ..access.audit import AUDIT_USER_AVC, MAX_TEXT, NETLINK_AUDIT, AuditWriter, user_avc_message

__all__ = ["AUDIT_USER_AVC", "MAX_TEXT", "NETLINK_AUDIT", "AuditWriter", "user_avc_message"]

"""IdentityService.DeleteAccount (GDPR Art. 17): the caller erases their own account.

In one transaction (plus the outbox, which tells the AIIDAs):
- a customer's accepted and active permissions are revoked (the AIIDA is told to stop,
  and the sinks' feed of ends refuses further readings within a second), pending ones
  rejected, and their instances unclaimed: claimable again with the pairing code;
- an eligible party's open data requests are closed and its live permissions terminated;
- refresh tokens are revoked, and e-mail, display name, password hash and the link to an
  external identity provider's subject are erased (the e-mail may sign up again).
The account row stays, erased: its id is the pseudonym that consent receipts and the
permission history name, so receipts stay verifiable.

After the commit, the access tokens of the account are refused at once in this process
(not after the authentication cache's window), its open streams end, and the connection
manager drops the unclaimed instances' streams. In cluster mode the deletion is then
announced to the other replicas (`on_deleted`, over NATS) before the call returns, and
they refuse the tokens and end the streams too.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable

from sqlalchemy import delete, func, select, update

from eddie.marketplace.v1 import data_request_pb2
from eddie_common.logging import log_event
from marketplace_server.aiida.manager import ConnectionManager
from marketplace_server.auth import AccessTokenAuthenticator, principal, role_name
from marketplace_server.clock import utcnow
from marketplace_server.db.models import (
    AccountRow,
    BucketClaimRow,
    DataRequestRow,
    ExternalIdentityRow,
    IdempotencyKeyRow,
    InstanceRow,
    OutboxRow,
    PermissionRow,
    RefreshTokenRow,
)
from marketplace_server.errors import InvalidArgument, PermissionDenied, Unauthenticated
from marketplace_server.services.events import EventHub
from marketplace_server.services.permissions import (
    ACTIVE_STATES,
    PENDING,
    REJECTED,
    REVOKED,
    TERMINATED,
    Move,
    PermissionLedger,
    PermissionTx,
)
from marketplace_server.services.receipts import REVOKE, ReceiptSigner, write_receipt

__all__ = ["AccountDeletion", "OnRevokedByDeletion", "parse_account_name", "revoke_receipts"]

log = logging.getLogger(__name__)

_ACCOUNT_NAME = re.compile(r"accounts/([A-Za-z0-9_-]{1,32})", re.ASCII)
CUSTOMER_REASON = "the customer deleted their account"
EP_REASON = "the eligible party deleted its account"
LIVE_STATES = (PENDING, *ACTIVE_STATES)
DataRequest = data_request_pb2.DataRequest
DROP_WAIT = 30.0  # at most this long an unclaimed instance's stream stays for its revokes
DROP_POLL = 0.1

# (transaction, the permission just revoked, the reason): runs inside the deletion's transaction.
OnRevokedByDeletion = Callable[[PermissionTx, PermissionRow, str], Awaitable[None]]


def revoke_receipts(signer: ReceiptSigner) -> OnRevokedByDeletion:
    """The hook that gives a permission revoked by a deletion its consent receipt (decision revoke)."""

    async def write(tx: PermissionTx, row: PermissionRow, reason: str) -> None:
        await write_receipt(tx.session, signer, row, REVOKE, reason)

    return write


def parse_account_name(name: str, field: str = "name") -> str:
    match = _ACCOUNT_NAME.fullmatch(name)
    if match is None:
        raise InvalidArgument.for_field(field, "required" if not name else "must be accounts/{id}")
    return match.group(1)


class AccountDeletion:
    """Deletes the caller's account with every effect API.md lists."""

    def __init__(
        self,
        ledger: PermissionLedger,
        authenticator: AccessTokenAuthenticator,
        manager: ConnectionManager,
        hub: EventHub,
    ) -> None:
        self.ledger = ledger
        self.authenticator = authenticator
        self.manager = manager
        self.hub = hub
        # Run in the deletion's transaction for each permission it revokes: the consent receipt of
        # the revocation (`revoke_receipts`, wired in server.py), like any RevokePermission.
        self.on_revoked_by_deletion: list[OnRevokedByDeletion] = []
        # Awaited after the commit with the deleted account's id (cluster mode: tell the other replicas).
        self.on_deleted: list[Callable[[str], Awaitable[None]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def delete(self, name: str) -> None:
        caller = principal()
        account_id = parse_account_name(name)
        if account_id != caller.account_id:
            raise PermissionDenied("only the account itself may delete it", reason="NOT_OWNER")
        async with self.ledger.transaction() as tx:
            account = await tx.session.get(AccountRow, account_id, populate_existing=True)
            if account is None or account.disabled:
                raise Unauthenticated(
                    "the account no longer exists or is disabled", reason="ACCOUNT_DISABLED"
                )
            role = account.role
            if caller.is_customer:
                ended = await self._end_permissions(tx, account_id, customer=True)
                unclaimed = await self._unclaim_instances(tx, account_id)
                closed = 0
            else:
                ended = await self._end_permissions(tx, account_id, customer=False)
                closed = await self._close_data_requests(tx, account_id)
                unclaimed = []
            await self._erase(tx, account)
        # No await since the commit: no call of this account can slip in between.
        self.authenticator.deny(account_id)
        self.hub.end_streams(
            account_id, Unauthenticated("the account was deleted", reason="ACCOUNT_DISABLED")
        )
        for announce in self.on_deleted:
            try:
                await announce(account_id)
            except Exception as exc:  # committed; elsewhere the authentication cache's window still ends
                log_event(log, "account_deletion_announce_failed", logging.WARNING, error=repr(exc)[:200])
        if unclaimed:
            told = [row.id for row in tx.deliveries]
            task = asyncio.create_task(self._drop_streams(unclaimed, told), name=f"unclaim:{account_id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        log_event(
            log,
            "account_deleted",
            account=account_id,
            role=role_name(role),
            permissions_ended=ended,
            instances_unclaimed=len(unclaimed),
            data_requests_closed=closed,
        )

    async def _end_permissions(self, tx: PermissionTx, account_id: str, *, customer: bool) -> int:
        """Ends every live permission of the account (as customer or as EP); returns how many."""
        party = PermissionRow.customer_id if customer else PermissionRow.eligible_party_id
        reason = CUSTOMER_REASON if customer else EP_REASON
        ids = list(
            await tx.session.scalars(
                select(PermissionRow.id).where(party == account_id, PermissionRow.state.in_(LIVE_STATES))
            )
        )

        def plan(row: PermissionRow) -> Move | None:
            if row.state == PENDING:
                return Move(REJECTED if customer else TERMINATED, reason)
            if row.state in ACTIVE_STATES:
                return Move(REVOKED if customer else TERMINATED, reason)
            return None

        for permission_id in ids:
            applied = await tx.apply(permission_id, plan)
            if applied.row is None or applied.previous_state not in ACTIVE_STATES:
                continue
            await tx.revoke(applied.row, reason)
            if customer:
                for hook in self.on_revoked_by_deletion:
                    await hook(tx, applied.row, reason)
        return len(ids)

    async def _drop_streams(self, instance_ids: list[str], deliveries: list[int]) -> None:
        """Drops the unclaimed instances' streams once their AIIDAs were told to stop (the outbox
        needs the stream to deliver), or after DROP_WAIT; an instance claimed again meanwhile keeps it."""
        sessions = self.ledger.sessions
        loop = asyncio.get_running_loop()
        give_up = loop.time() + DROP_WAIT
        while deliveries and loop.time() < give_up:
            async with sessions() as session:
                waiting = await session.scalar(
                    select(func.count())
                    .select_from(OutboxRow)
                    .where(OutboxRow.id.in_(deliveries), OutboxRow.done.is_(False))
                )
            if not waiting:
                break
            await asyncio.sleep(DROP_POLL)
        async with sessions() as session:
            still_unclaimed = list(
                await session.scalars(
                    select(InstanceRow.instance_id).where(
                        InstanceRow.instance_id.in_(instance_ids), InstanceRow.owner_id.is_(None)
                    )
                )
            )
        for instance_id in still_unclaimed:
            await self.manager.drop(instance_id)

    async def _unclaim_instances(self, tx: PermissionTx, account_id: str) -> list[str]:
        ids = list(
            await tx.session.scalars(
                select(InstanceRow.instance_id).where(InstanceRow.owner_id == account_id)
            )
        )
        if ids:
            # Each unclaimed row makes a trigger update its bucket's `bucket_claims` row (locked until
            # the commit), in whatever order the UPDATE meets the rows. Two deletions at once could
            # thus lock two buckets in opposite orders (a deadlock, one of them failing): lock them
            # in bucket order first. (SQLite has no row locks: FOR UPDATE is left out there.)
            await tx.session.execute(
                select(BucketClaimRow.bucket)
                .where(
                    BucketClaimRow.bucket.in_(
                        select(InstanceRow.bucket).where(InstanceRow.owner_id == account_id)
                    )
                )
                .order_by(BucketClaimRow.bucket)
                .with_for_update()
            )
            await tx.session.execute(
                update(InstanceRow)
                .where(InstanceRow.owner_id == account_id)
                .values(owner_id=None, claim_time=None)
                .execution_options(synchronize_session=False)
            )
        return ids

    async def _close_data_requests(self, tx: PermissionTx, account_id: str) -> int:
        result = await tx.session.execute(
            update(DataRequestRow)
            .where(DataRequestRow.owner_id == account_id, DataRequestRow.state != DataRequest.STATE_CLOSED)
            .values(state=DataRequest.STATE_CLOSED, close_time=utcnow())
            .execution_options(synchronize_session=False)
        )
        return int(result.rowcount or 0)  # type: ignore[attr-defined]

    async def _erase(self, tx: PermissionTx, account: AccountRow) -> None:
        session = tx.session
        await session.execute(
            update(RefreshTokenRow).where(RefreshTokenRow.account_id == account.id).values(revoked=True)
        )
        await session.execute(delete(IdempotencyKeyRow).where(IdempotencyKeyRow.account_id == account.id))
        # The external identity provider's subject is personal data too; a new sign-in there
        # starts a new account.
        await session.execute(delete(ExternalIdentityRow).where(ExternalIdentityRow.account_id == account.id))
        account.email = ""
        account.email_normalized = f"deleted:{account.id}"  # unique, and never a valid e-mail
        account.display_name = ""
        account.password_hash = ""
        account.disabled = True
        account.delete_time = utcnow()
        await session.flush()

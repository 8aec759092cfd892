// @ts-check
// A Node.js policy service that publishes its govflow events through the transactional
// outbox: the policy's new status and its `policy.status_changed` event commit together,
// or neither does. `govflow run --role relay` publishes the event once it has committed.
//
//   npm install
//   DATABASE_URL=postgresql://... node index.mjs POL-1042 pending_approval
//
// It prints the event id. Plain JavaScript with JSDoc types (`// @ts-check`), so an
// editor type-checks it and there is no build step.

import { randomUUID } from "node:crypto";
import { pathToFileURL } from "node:url";
import pg from "pg";

/**
 * A field's value before and after the change.
 * @typedef {{ from: unknown, to: unknown }} Change
 */

/**
 * One event in govflow's wire format (`govflow schema` prints its JSON Schema).
 * @typedef {object} GovflowEvent
 * @property {string} id            your choice, and the event's identity: the same id runs once
 * @property {string} type          `<policy|assessment|evidence>.<created|updated|status_changed|deleted>`
 * @property {string} tenant
 * @property {string} entity_id
 * @property {string} occurred_at   RFC 3339, e.g. `2026-11-28T09:30:00Z`
 * @property {string | null} [actor]
 * @property {Record<string, unknown>} [data]      the entity after the change
 * @property {Record<string, Change>} [changes]   `{field: {from, to}}`
 * @property {1} [schema_version]
 */

/**
 * Write `event` into the outbox on `client`, inside the caller's transaction.
 * @param {pg.ClientBase} client
 * @param {GovflowEvent} event
 * @returns {Promise<string>} the outbox row id
 */
export async function enqueue(client, event) {
  const { rows } = await client.query(
    "INSERT INTO outbox (event) VALUES ($1::jsonb) RETURNING id",
    [JSON.stringify(event)],
  );
  return String(rows[0].id);
}

/**
 * Move a policy to `status` and publish the change, in one transaction.
 * @param {pg.ClientBase} client
 * @param {string} policyId
 * @param {string} status
 * @returns {Promise<GovflowEvent>}
 */
export async function changePolicyStatus(client, policyId, status) {
  await client.query("BEGIN");
  try {
    const found = await client.query(
      "SELECT status FROM policies WHERE id = $1 FOR UPDATE",
      [policyId],
    );
    if (found.rowCount === 0) {
      throw new Error(`no policy ${policyId}`);
    }
    const before = found.rows[0].status;
    await client.query("UPDATE policies SET status = $2 WHERE id = $1", [policyId, status]);
    /** @type {GovflowEvent} */
    const event = {
      id: randomUUID(),
      type: "policy.status_changed",
      tenant: "acme",
      entity_id: policyId,
      occurred_at: new Date().toISOString(),
      actor: "node-producer",
      data: { status },
      changes: { status: { from: before, to: status } },
      schema_version: 1,
    };
    await enqueue(client, event);
    await client.query("COMMIT");
    return event;
  } catch (err) {
    await client.query("ROLLBACK");
    throw err;
  }
}

async function main() {
  const [policyId, status] = process.argv.slice(2);
  if (!policyId || !status || !process.env.DATABASE_URL) {
    console.error("usage: DATABASE_URL=postgresql://... node index.mjs POLICY_ID STATUS");
    process.exit(2);
  }
  const client = new pg.Client({ connectionString: process.env.DATABASE_URL });
  await client.connect();
  try {
    const event = await changePolicyStatus(client, policyId, status);
    console.log(event.id);
  } finally {
    await client.end();
  }
}

// Run as a program, not when imported for `enqueue`.
if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().catch((err) => {
    console.error(`node-producer: ${err instanceof Error ? err.message : err}`);
    process.exit(1);
  });
}

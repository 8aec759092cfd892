// BullMQ (Node.js): each job as two job names on one queue; `pg` with a pool per process.
//   worker:   node bullmq_app.cjs worker CONCURRENCY
//   producer: node bullmq_app.cjs produce RUN N RATE [drain|notify]   (addBulk for a backlog)
// The notify job POSTs to BENCH_WEBHOOK_URL with Node's own fetch (undici, keep-alive).
// Modules come from benchmarks/.peers/node/node_modules through NODE_PATH.
"use strict";
const crypto = require("node:crypto");
const { Queue, Worker } = require("bullmq");
const IORedis = require("ioredis");
const pg = require("pg");

const REDIS_URL = process.env.BENCH_REDIS_URL;
const SCHEMA = process.env.BENCH_SCHEMA;
const QUEUE = process.env.BENCH_QUEUE;
const PREFIX = `${QUEUE}:bull`;
const JOB_OPTS = { removeOnComplete: true, removeOnFail: 1000, attempts: 3 };
const WEBHOOK_URL = process.env.BENCH_WEBHOOK_URL;
// Postgres connections per process (the Python peers' DB_CONNECTIONS): a job holds one only
// for its SQL, so the notify job's many jobs in flight share them.
const DB_CONNECTIONS = 8;
const SIGNING_KEY = "bench-signing-key";
const DRAIN = "bench-drain";
const NOTIFY = "bench-notify";
const NS = Buffer.from("6c1f7d4e3b0a4f2e9a510c9e7f3d2b18", "hex");

function uuid5(name) {
  const hash = crypto.createHash("sha1").update(NS).update(name).digest();
  hash[6] = (hash[6] & 0x0f) | 0x50;
  hash[8] = (hash[8] & 0x3f) | 0x80;
  const h = hash.subarray(0, 16).toString("hex");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

const SQL = {
  execution: `INSERT INTO ${SCHEMA}.workflow_executions (id, workflow_name, workflow_version,
    event_id, entity_type, entity_id, tenant, event_occurred_at)
    VALUES ($1, $2, 1, $3, $4, $5, 'default', to_timestamp($6))
    ON CONFLICT (tenant, event_id, workflow_name) DO NOTHING`,
  task: `INSERT INTO ${SCHEMA}.tasks (execution_id, step, entity_id, title, assignee)
    VALUES ($1, 1, $2, $3, $4) ON CONFLICT (execution_id, step) DO NOTHING`,
  assignment: `INSERT INTO ${SCHEMA}.assignments (execution_id, step, entity_id, assignee)
    VALUES ($1, 2, $2, 'risk-team') ON CONFLICT (execution_id, step) DO NOTHING`,
  notification: `INSERT INTO ${SCHEMA}.notifications (execution_id, step, webhook, message,
    idempotency_key, response_status) VALUES ($1, 1, $2, $3, $4, $5)
    ON CONFLICT (execution_id, step) DO NOTHING`,
  finish: `UPDATE ${SCHEMA}.workflow_executions SET status = 'completed', last_error = NULL,
    updated_at = now(), finished_at = now() WHERE id = $1`,
};

function connection() {
  return new IORedis(REDIS_URL, { maxRetriesPerRequest: null });
}

// Job 1 of either kind: the execution row (one commit), then job 2 enqueued.
async function record(db, queue, e, workflow, next) {
  const id = uuid5(`${e.id}\x1f${workflow}`);
  const entityType = workflow === NOTIFY ? "evidence" : "policy";
  await db.query(SQL.execution, [id, workflow, e.id, entityType, e.entity_id, e.at]);
  await queue.add(next, { ...e, execution_id: id }, JOB_OPTS);
}

// Run `statements(client)` in one transaction on a pooled connection.
async function transaction(db, statements) {
  const client = await db.connect();
  try {
    await client.query("BEGIN");
    await statements(client);
    await client.query("COMMIT");
  } catch (err) {
    await client.query("ROLLBACK");
    throw err;
  } finally {
    client.release();
  }
}

async function effects(db, e) {
  await transaction(db, async (client) => {
    await client.query(SQL.task, [e.execution_id, e.entity_id, `Review ${e.title}`, e.owner]);
    await client.query(SQL.assignment, [e.execution_id, e.entity_id]);
    await client.query(SQL.finish, [e.execution_id]);
  });
}

// The webhook, signed as govflow signs its own; a failed answer throws, and BullMQ retries.
async function notify(db, e) {
  const message = `Evidence ${e.entity_id} recorded`;
  const key = `${e.execution_id}:1`;
  const body = JSON.stringify({
    execution_id: e.execution_id, workflow: NOTIFY, step: 1, event_id: e.id,
    event_type: "evidence.created", tenant: "default", entity_id: e.entity_id, message,
  });
  const signature = crypto.createHmac("sha256", SIGNING_KEY).update(body).digest("hex");
  const answer = await fetch(WEBHOOK_URL, {
    method: "POST",
    body,
    headers: { "Content-Type": "application/json", "Idempotency-Key": key, "X-Signature": `sha256=${signature}` },
  });
  await answer.arrayBuffer(); // read to the end, so that the connection is kept alive
  if (!answer.ok) throw new Error(`webhook answered ${answer.status}`);
  await transaction(db, async (client) => {
    await client.query(SQL.notification, [e.execution_id, WEBHOOK_URL, message, key, answer.status]);
    await client.query(SQL.finish, [e.execution_id]);
  });
}

async function worker(concurrency) {
  const db = new pg.Pool({
    connectionString: process.env.BENCH_DATABASE_URL,
    max: Math.min(concurrency, DB_CONNECTIONS),
  });
  const queue = new Queue(QUEUE, { connection: connection(), prefix: PREFIX });
  const jobs = {
    record: (e) => record(db, queue, e, DRAIN, "effects"),
    effects: (e) => effects(db, e),
    notify_record: (e) => record(db, queue, e, NOTIFY, "notify"),
    notify: (e) => notify(db, e),
  };
  const w = new Worker(QUEUE, (job) => jobs[job.name](job.data), {
    connection: connection(),
    prefix: PREFIX,
    concurrency,
  });
  // A job that fails is retried, then dropped: say why, so that a stalled run's log tells.
  w.on("failed", (job, err) => console.error(`job ${job && job.name} failed: ${err.message}`));
  const stop = async () => {
    await w.close();
    await queue.close();
    await db.end();
    process.exit(0);
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

function event(run, i) {
  return { id: `${run}-${i}`, entity_id: `POL-${i}`, title: `Policy ${i}`, owner: `user-${i % 50}`, at: Date.now() / 1000 };
}

async function produce(run, n, rate, kind) {
  const first = kind === "notify" ? "notify_record" : "record";
  const queue = new Queue(QUEUE, { connection: connection(), prefix: PREFIX });
  await queue.waitUntilReady();
  const started = performance.now();
  let sent = 0;
  while (sent < n) {
    let due;
    if (rate <= 0) {
      due = Math.min(n, sent + 1000);
    } else {
      due = Math.min(n, Math.floor(((performance.now() - started) / 1000) * rate) + 1);
      if (due <= sent) {
        await new Promise((r) => setTimeout(r, Math.max(0, (sent / rate) * 1000 - (performance.now() - started))));
        continue;
      }
    }
    const jobs = [];
    for (let i = sent; i < due; i++) jobs.push({ name: first, data: event(run, i), opts: JOB_OPTS });
    await queue.addBulk(jobs);
    sent = due;
  }
  const seconds = (performance.now() - started) / 1000;
  await queue.close();
  process.stdout.write(JSON.stringify({ enqueued: n, seconds }) + "\n");
  process.exit(0);
}

const [mode, ...args] = process.argv.slice(2);
if (mode === "worker") {
  worker(Number(args[0] || 8));
} else {
  produce(args[0], Number(args[1]), Number(args[2]), args[3] || "drain");
}

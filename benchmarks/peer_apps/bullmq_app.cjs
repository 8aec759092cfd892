// BullMQ (Node.js): the job as two job names on one queue; `pg` with a pool per process.
//   worker:   node bullmq_app.cjs worker CONCURRENCY
//   producer: node bullmq_app.cjs produce RUN N RATE   (addBulk for a backlog)
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
    VALUES ($1, 'bench-drain', 1, $2, 'policy', $3, 'default', to_timestamp($4))
    ON CONFLICT (tenant, event_id, workflow_name) DO NOTHING`,
  task: `INSERT INTO ${SCHEMA}.tasks (execution_id, step, entity_id, title, assignee)
    VALUES ($1, 1, $2, $3, $4) ON CONFLICT (execution_id, step) DO NOTHING`,
  assignment: `INSERT INTO ${SCHEMA}.assignments (execution_id, step, entity_id, assignee)
    VALUES ($1, 2, $2, 'risk-team') ON CONFLICT (execution_id, step) DO NOTHING`,
  finish: `UPDATE ${SCHEMA}.workflow_executions SET status = 'completed', last_error = NULL,
    updated_at = now(), finished_at = now() WHERE id = $1`,
};

function connection() {
  return new IORedis(REDIS_URL, { maxRetriesPerRequest: null });
}

async function worker(concurrency) {
  const db = new pg.Pool({ connectionString: process.env.BENCH_DATABASE_URL, max: concurrency });
  const queue = new Queue(QUEUE, { connection: connection(), prefix: PREFIX });
  const w = new Worker(
    QUEUE,
    async (job) => {
      const e = job.data;
      if (job.name === "record") {
        const id = uuid5(`${e.id}\x1fbench-drain`);
        await db.query(SQL.execution, [id, e.id, e.entity_id, e.at]);
        await queue.add("effects", { ...e, execution_id: id }, JOB_OPTS);
        return;
      }
      const client = await db.connect();
      try {
        await client.query("BEGIN");
        await client.query(SQL.task, [e.execution_id, e.entity_id, `Review ${e.title}`, e.owner]);
        await client.query(SQL.assignment, [e.execution_id, e.entity_id]);
        await client.query(SQL.finish, [e.execution_id]);
        await client.query("COMMIT");
      } catch (err) {
        await client.query("ROLLBACK");
        throw err;
      } finally {
        client.release();
      }
    },
    { connection: connection(), prefix: PREFIX, concurrency },
  );
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

async function produce(run, n, rate) {
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
    for (let i = sent; i < due; i++) jobs.push({ name: "record", data: event(run, i), opts: JOB_OPTS });
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
  produce(args[0], Number(args[1]), Number(args[2]));
}

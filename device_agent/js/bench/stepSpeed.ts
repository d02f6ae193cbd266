/**
 * Steps per second of the training step in onnxruntime-node, run the way the agent runs it
 * (StepTrainer: batch, weights and optimizer state fed in, the new ones kept), for bench/training_step_node.py:
 *
 *   node dist/bench/stepSpeed.js MODEL.pfm STEP.onnx DATA.npz BATCH WARMUP LR THREADS
 *
 * DATA holds (WARMUP + timed) * BATCH items, already as the model's input. Prints one JSON line:
 * the median milliseconds per step after WARMUP steps, the session load time and the process's peak RSS.
 */

import { readFileSync } from "node:fs";
import { performance } from "node:perf_hooks";

import { readModel } from "../src/model.js";
import { readNpz } from "../src/node/npz.js";
import { ortRuntime, type OrtModule } from "../src/runtime.js";
import { StepTrainer } from "../src/trainer.js";

async function main([modelPath, stepPath, dataPath, batch, warmup, lr, threads]: string[]): Promise<void> {
  const ort = (await import("onnxruntime-node")).default as unknown as OrtModule;
  const model = readModel(new Uint8Array(readFileSync(modelPath!)));
  const runtime = ortRuntime(ort, { intraOpNumThreads: Number(threads), interOpNumThreads: 1 });
  const loadStart = performance.now();
  const trainer = await StepTrainer.create(runtime, new Uint8Array(readFileSync(stepPath!)), model);
  const loadMs = performance.now() - loadStart;
  const data = readNpz(dataPath!);
  const stamps: number[] = [];
  const start = performance.now();
  await trainer.fit(data, {
    epochs: 1,
    batchSize: Number(batch),
    lr: Number(lr),
    seed: 0,
    shuffle: false,
    onStep: () => stamps.push(performance.now()),
  });
  const times = [stamps[0]! - start, ...stamps.slice(1).map((t, i) => t - stamps[i]!)].slice(Number(warmup));
  times.sort((a, b) => a - b);
  const median =
    times.length % 2 ? times[(times.length - 1) / 2]! : (times[times.length / 2 - 1]! + times[times.length / 2]!) / 2;
  await trainer.release();
  console.log(
    JSON.stringify({
      ms: median,
      steps: times.length,
      load_ms: loadMs,
      peak_rss_mib: process.resourceUsage().maxRSS / 1024,
    }),
  );
}

main(process.argv.slice(2)).catch((error: unknown) => {
  console.error(error);
  process.exit(1);
});

// Peer benchmark helper for bench/peer_llamacpp.sh: runs llama.cpp through the
// prebuilt binaries of the npm package node-llama-cpp (CPU only, never builds
// or downloads anything), and adds a vocabulary to GGUF files that have none.
//
//   node peer_llamacpp.mjs info
//   node peer_llamacpp.mjs tokenize --model F.gguf --text TEXT
//   node peer_llamacpp.mjs add-vocab --in F.gguf --out G.gguf
//   node peer_llamacpp.mjs bench --model F.gguf [--threads 2 --ctx 1024 --batch 512
//                          --prompt 512 --decode 64 --reps 3 --flash-attn auto|on|off]
//   node peer_llamacpp.mjs report --in RESULTS.jsonl [--json OUT.json]
//
// The node-llama-cpp install is found through PEER_NODE_MODULES (a
// node_modules directory). Each command prints one JSON object on stdout;
// llama.cpp's own log goes to --log FILE (default: discarded).
import fs from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";

function parseArgs(argv) {
    const o = { _: [] };
    for (let i = 0; i < argv.length; i++) {
        const a = argv[i];
        if (a.startsWith("--")) {
            const k = a.slice(2);
            if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
            o[k] = argv[++i];
        } else o._.push(a);
    }
    return o;
}

function fail(msg) {
    process.stderr.write(`peer_llamacpp.mjs: ${msg}\n`);
    process.exit(1);
}

async function loadNlc() {
    const nm = process.env.PEER_NODE_MODULES;
    if (!nm) fail("PEER_NODE_MODULES is not set (run bench/peer_llamacpp.sh)");
    const pkgDir = path.join(nm, "node-llama-cpp");
    const pkg = JSON.parse(fs.readFileSync(path.join(pkgDir, "package.json"), "utf8"));
    const entry = pkg.exports?.["."]?.import ?? pkg.main;
    const mod = await import(pathToFileURL(path.join(pkgDir, entry)).href);
    return { mod, version: pkg.version };
}

/* ---- llama.cpp through node-llama-cpp ---- */

async function openLlama(o) {
    const { mod, version } = await loadNlc();
    const logs = [];
    const llama = await mod.getLlama({
        gpu: false,            // CPU backend only
        build: "never",        // never compile llama.cpp from source
        skipDownload: true,    // never fetch llama.cpp sources or binaries
        usePrebuiltBinaries: true,
        progressLogs: false,
        maxThreads: Number(o.threads ?? 2),
        logLevel: mod.LlamaLogLevel.debug,
        logger: (level, message) => logs.push(`[${level}] ${message}`),
    });
    const backendLine = () => logs.find((l) => /load_backend: loaded CPU backend/.test(l)) ?? "";
    const info = () => {
        const m = /from (\S+)/.exec(backendLine());
        return {
            node_llama_cpp: version,
            llama_cpp_release: llama.llamaCppRelease?.release,
            build_type: llama.buildType,
            gpu: llama.gpu,
            cpu_backend: m ? path.basename(m[1]) : "",
            cpu_backend_path: m ? m[1] : "",
            system_info: (llama.systemInfo ?? "").trim(),
        };
    };
    const writeLog = () => {
        if (o.log) fs.writeFileSync(o.log, logs.join("\n") + "\n");
    };
    return { mod, llama, logs, info, writeLog };
}

// A small fixed-seed generator, so every run evaluates the same token ids.
function rng(seed) {
    let s = BigInt(seed) || 1n;
    return (n) => {
        s ^= (s << 13n) & 0xffffffffffffffffn;
        s ^= s >> 7n;
        s ^= (s << 17n) & 0xffffffffffffffffn;
        return Number(s % BigInt(n));
    };
}

async function cmdBench(o) {
    if (!o.model) fail("bench needs --model FILE");
    const threads = Number(o.threads ?? 2), ctxSize = Number(o.ctx ?? 1024);
    const batch = Number(o.batch ?? 512), nPrompt = Number(o.prompt ?? 512);
    const nDecode = Number(o.decode ?? 64), reps = Number(o.reps ?? 3);
    const fa = { auto: "auto", on: true, off: false }[o["flash-attn"] ?? "auto"];
    if (fa === undefined) fail("--flash-attn is auto, on or off");
    if (nPrompt > batch || nPrompt + nDecode > ctxSize) fail("need prompt <= batch and prompt+decode <= ctx");
    const L = await openLlama(o);
    const t0 = performance.now();
    let model;
    try {
        model = await L.llama.loadModel({ modelPath: o.model, gpuLayers: 0 });
    } catch (e) {
        L.writeLog();
        const why = L.logs.filter((l) => l.startsWith("[error]")).join("; ");
        fail(`llama.cpp cannot load ${o.model}: ${why || e.message}`);
    }
    const loadS = (performance.now() - t0) / 1e3;
    const ctx = await model.createContext({
        contextSize: ctxSize, batchSize: batch, sequences: 1, threads, flashAttention: fa,
    });
    const seq = ctx.getSequence();
    const nVocab = model.fileInfo.metadata?.llama?.vocab_size ?? model.tokens.tokenizer?.length;
    const vocab = Number(o.vocab ?? model.fileInsights?.vocabularySize ?? nVocab ?? 32000);
    const next = rng(7);
    const prompt = Array.from({ length: nPrompt }, () => next(vocab));
    // logits for the last prompt token only, as kvpred's bench does
    const promptIn = prompt.map((t, i) => (i === nPrompt - 1 ? [t, { generateNext: { token: true } }] : t));
    const times = [];
    for (let r = 0; r < reps + 1; r++) { // the first pass is a warm-up
        await seq.clearHistory();
        const t = performance.now();
        const out = await seq.controlledEvaluate(promptIn);
        times.push(performance.now() - t);
        if (out[nPrompt - 1]?.next?.token === undefined) fail("prefill produced no token");
    }
    const prefillMs = Math.min(...times.slice(1));
    // decode: one token a call, logits and a greedy sample each time
    const decodeIn = Array.from({ length: nDecode }, () => next(vocab));
    const td = performance.now();
    for (const t of decodeIn) await seq.controlledEvaluate([[t, { generateNext: { token: true } }]]);
    const decodeS = (performance.now() - td) / 1e3;
    const res = {
        engine: "llama.cpp",
        model: o.model,
        ...L.info(),
        threads: ctx.currentThreads,
        context: ctx.contextSize,
        batch: ctx.batchSize,
        flash_attention: ctx.flashAttention,
        vocab,
        load_s: loadS,
        prompt_tokens: nPrompt,
        decode_tokens: nDecode,
        prefill_ms_all: times,
        prefill_ms: prefillMs,
        prefill_tokens_per_s: nPrompt / (prefillMs / 1e3),
        decode_tokens_per_s: nDecode / decodeS,
    };
    await ctx.dispose();
    await model.dispose();
    L.writeLog();
    return res;
}

async function cmdTokenize(o) {
    if (!o.model || o.text === undefined) fail("tokenize needs --model FILE --text TEXT");
    const L = await openLlama(o);
    let model;
    try {
        model = await L.llama.loadModel({ modelPath: o.model, gpuLayers: 0 });
    } catch (e) {
        L.writeLog();
        fail(`llama.cpp cannot load ${o.model}: ${L.logs.filter((l) => l.startsWith("[error]")).join("; ") || e.message}`);
    }
    const toks = Array.from(model.tokenize(o.text, false));
    const res = {
        ...L.info(),
        model: o.model,
        tokens: toks,
        bos: model.tokens.bos,
        eos: model.tokens.eos,
        adds_bos: model.tokens.shouldPrependBosToken,
        detokenized_equal: model.detokenize(toks) === o.text,
    };
    await model.dispose();
    L.writeLog();
    return res;
}

async function cmdInfo(o) {
    const L = await openLlama(o);
    // the CPU backend is only loaded once a model is, so load a file if given
    if (o.model) await (await L.llama.loadModel({ modelPath: o.model, gpuLayers: 0 })).dispose();
    L.writeLog();
    return L.info();
}

/* ---- GGUF: add kvpred's byte-level vocabulary to a file that has none ---- */

const GT = { U8: 0, I8: 1, U16: 2, I16: 3, U32: 4, I32: 5, F32: 6, BOOL: 7, STR: 8, ARR: 9, U64: 10, I64: 11, F64: 12 };
const SIZE = { 0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8 };

function parseGgufHeader(buf) {
    let p = 0;
    const need = (n) => { if (p + n > buf.length) throw new Error("GGUF header larger than the read buffer"); };
    const u32 = () => { need(4); const v = buf.readUInt32LE(p); p += 4; return v; };
    const u64 = () => { need(8); const v = buf.readBigUInt64LE(p); p += 8; return Number(v); };
    const str = () => { const n = u64(); need(n); const s = buf.toString("utf8", p, p + n); p += n; return s; };
    const val = (t) => {
        if (t === GT.STR) return str();
        if (t === GT.ARR) {
            const et = u32(), n = u64();
            if (et === GT.STR || et === GT.ARR) { for (let i = 0; i < n; i++) val(et); return { array: n }; }
            need(n * SIZE[et]); p += n * SIZE[et]; return { array: n };
        }
        const s = SIZE[t];
        if (!s) throw new Error(`bad GGUF value type ${t}`);
        need(s);
        const v = t === GT.U32 ? buf.readUInt32LE(p) : t === GT.I32 ? buf.readInt32LE(p)
            : t === GT.U64 ? Number(buf.readBigUInt64LE(p)) : t === GT.BOOL ? buf[p] !== 0 : null;
        p += s;
        return v;
    };
    need(24);
    if (buf.toString("latin1", 0, 4) !== "GGUF") throw new Error("not a GGUF file");
    p = 4;
    const version = u32(), nTensors = u64(), nKv = u64();
    const kvStart = p, kv = {};
    for (let i = 0; i < nKv; i++) { const k = str(); kv[k] = val(u32()); }
    const kvEnd = p, tensors = [];
    for (let i = 0; i < nTensors; i++) {
        const name = str(), nd = u32(), dims = [];
        for (let d = 0; d < nd; d++) dims.push(u64());
        const type = u32(), offset = u64();
        tensors.push({ name, dims, type, offset });
    }
    const tiEnd = p, align = kv["general.alignment"] ?? 32;
    return { version, nTensors, nKv, kv, kvStart, kvEnd, tiEnd, align, dataStart: Math.ceil(tiEnd / align) * align, tensors };
}

// GPT-2's byte-to-unicode map: the token text kvpred uses for each byte.
function byteTokens() {
    const bs = [];
    for (let b = 33; b <= 126; b++) bs.push(b);
    for (let b = 161; b <= 172; b++) bs.push(b);
    for (let b = 174; b <= 255; b++) bs.push(b);
    const cs = bs.slice();
    let n = 0;
    for (let b = 0; b < 256; b++) if (!bs.includes(b)) { bs.push(b); cs.push(256 + n++); }
    const out = new Array(256);
    bs.forEach((b, i) => { out[b] = String.fromCodePoint(cs[i]); });
    return out;
}

function kvBytes(entries) {
    const parts = [];
    const u32 = (v) => { const b = Buffer.alloc(4); b.writeUInt32LE(v); parts.push(b); };
    const i32 = (v) => { const b = Buffer.alloc(4); b.writeInt32LE(v); parts.push(b); };
    const u64 = (v) => { const b = Buffer.alloc(8); b.writeBigUInt64LE(BigInt(v)); parts.push(b); };
    const str = (s) => { const b = Buffer.from(s, "utf8"); u64(b.length); parts.push(b); };
    for (const [k, t, v, et] of entries) {
        str(k); u32(t);
        if (t === GT.STR) str(v);
        else if (t === GT.U32) u32(v);
        else if (t === GT.BOOL) parts.push(Buffer.from([v ? 1 : 0]));
        else if (t === GT.ARR) {
            u32(et); u64(v.length);
            for (const x of v) (et === GT.STR ? str : et === GT.I32 ? i32 : u32)(x);
        }
    }
    return Buffer.concat(parts);
}

function cmdAddVocab(o) {
    if (!o.in || !o.out) fail("add-vocab needs --in FILE --out FILE");
    const fd = fs.openSync(o.in, "r");
    const size = fs.fstatSync(fd).size;
    const head = Buffer.alloc(Math.min(size, 64 << 20));
    fs.readSync(fd, head, 0, head.length, 0);
    const h = parseGgufHeader(head);
    if (h.kv["tokenizer.ggml.model"] !== undefined) {
        fs.closeSync(fd);
        return { added: false, out: o.in, reason: "file already has a tokenizer" };
    }
    const emb = h.tensors.find((t) => t.name === "token_embd.weight");
    const nVocab = h.kv["llama.vocab_size"] ?? emb?.dims[1];
    if (!nVocab || nVocab < 258) fail(`cannot tell the vocabulary size of ${o.in}`);
    // kvpred's byte-level vocabulary (256 bytes, BOS, EOS), padded with unused tokens
    const tokens = byteTokens().concat(["<|bos|>", "<|eos|>"]);
    const types = new Array(256).fill(1).concat([3, 3]);
    for (let i = tokens.length; i < nVocab; i++) { tokens.push(`<|unused_${i}|>`); types.push(5); }
    const add = kvBytes([
        ["tokenizer.ggml.model", GT.STR, "gpt2"],
        ["tokenizer.ggml.pre", GT.STR, "gpt-2"],
        ["tokenizer.ggml.tokens", GT.ARR, tokens, GT.STR],
        ["tokenizer.ggml.token_type", GT.ARR, types, GT.I32],
        ["tokenizer.ggml.merges", GT.ARR, [], GT.STR],
        ["tokenizer.ggml.bos_token_id", GT.U32, 256],
        ["tokenizer.ggml.eos_token_id", GT.U32, 257],
        ["tokenizer.ggml.add_bos_token", GT.BOOL, true],
        ["tokenizer.ggml.add_eos_token", GT.BOOL, false],
    ]);
    const pre = Buffer.from(head.subarray(0, h.kvEnd));
    pre.writeBigUInt64LE(BigInt(h.nKv + 9), 16);
    const ti = head.subarray(h.kvEnd, h.tiEnd);
    const hdrLen = pre.length + add.length + ti.length;
    const pad = Buffer.alloc(Math.ceil(hdrLen / h.align) * h.align - hdrLen);
    const tmp = `${o.out}.tmp${process.pid}`;
    const out = fs.openSync(tmp, "w");
    for (const b of [pre, add, ti, pad]) fs.writeSync(out, b);
    const chunk = Buffer.alloc(16 << 20);
    for (let pos = h.dataStart; pos < size;) {
        const n = fs.readSync(fd, chunk, 0, chunk.length, pos);
        if (n <= 0) break;
        fs.writeSync(out, chunk, 0, n);
        pos += n;
    }
    fs.closeSync(out);
    fs.closeSync(fd);
    fs.renameSync(tmp, o.out);
    return { added: true, out: o.out, vocab: nVocab, tensor_bytes: size - h.dataStart };
}

/* ---- the table: every measurement, then the best of the rounds per engine ---- */

function cmdReport(o) {
    const rows = fs.readFileSync(o.in, "utf8").split("\n").filter(Boolean).map((l) => JSON.parse(l));
    const meta = rows.filter((r) => r.kind === "meta");
    const ms = rows.filter((r) => r.kind === "measurement");
    const f = (v, d = 1) => (v === undefined || v === null || Number.isNaN(v) ? "-" : Number(v).toFixed(d));
    const pad = (s, n) => String(s).padStart(n);
    const out = [];
    out.push("measurements (in the order they ran; load = 1-min load average before/after):");
    out.push(`${"round".padEnd(6)}${"file".padEnd(26)}${"engine".padEnd(11)}${pad("prefill ms", 11)}${pad("prefill t/s", 12)}${pad("decode t/s", 11)}${pad("load", 12)}`);
    for (const m of ms)
        out.push(`${String(m.round).padEnd(6)}${m.label.padEnd(26)}${m.engine.padEnd(11)}${pad(f(m.prefill_ms), 11)}${pad(f(m.prefill_tokens_per_s, 0), 12)}${pad(f(m.decode_tokens_per_s), 11)}${pad(`${f(m.load_before, 2)}/${f(m.load_after, 2)}`, 12)}`);
    const labels = [...new Set(ms.map((m) => m.label))];
    const summary = [];
    for (const label of labels) {
        const best = (engine, k) => {
            const v = ms.filter((m) => m.label === label && m.engine === engine).map((m) => m[k]).filter((x) => x > 0);
            return v.length ? Math.max(...v) : undefined;
        };
        const s = { label };
        for (const e of ["kvpred", "llama.cpp"]) {
            const k = e === "kvpred" ? "kvpred" : "llamacpp";
            s[`${k}_prefill_tokens_per_s`] = best(e, "prefill_tokens_per_s");
            s[`${k}_decode_tokens_per_s`] = best(e, "decode_tokens_per_s");
        }
        s.prefill_ratio = s.kvpred_prefill_tokens_per_s / s.llamacpp_prefill_tokens_per_s;
        s.decode_ratio = s.kvpred_decode_tokens_per_s / s.llamacpp_decode_tokens_per_s;
        summary.push(s);
    }
    out.push("");
    out.push("best of the rounds (tokens/s; ratio = kvpred / llama.cpp, > 1 means kvpred is faster):");
    out.push(`${"file".padEnd(26)}${pad("kvpred pre", 11)}${pad("llama pre", 11)}${pad("ratio", 7)}${pad("kvpred dec", 12)}${pad("llama dec", 11)}${pad("ratio", 7)}`);
    for (const s of summary)
        out.push(`${s.label.padEnd(26)}${pad(f(s.kvpred_prefill_tokens_per_s, 0), 11)}${pad(f(s.llamacpp_prefill_tokens_per_s, 0), 11)}${pad(f(s.prefill_ratio, 2), 7)}${pad(f(s.kvpred_decode_tokens_per_s), 12)}${pad(f(s.llamacpp_decode_tokens_per_s), 11)}${pad(f(s.decode_ratio, 2), 7)}`);
    process.stdout.write(out.join("\n") + "\n");
    const doc = { bench: "peer_llamacpp", ...Object.assign({}, ...meta.map(({ kind, ...r }) => r)), measurements: ms.map(({ kind, ...r }) => r), summary };
    if (o.json) fs.writeFileSync(o.json, JSON.stringify(doc, null, 2) + "\n");
    return null;
}

const [cmd, ...rest] = process.argv.slice(2);
const o = parseArgs(rest);
const cmds = { bench: cmdBench, tokenize: cmdTokenize, info: cmdInfo, "add-vocab": cmdAddVocab, report: cmdReport };
if (!cmds[cmd]) fail(`unknown command '${cmd ?? ""}' (bench, tokenize, info, add-vocab, report)`);
try {
    const res = await cmds[cmd](o);
    if (res !== null) process.stdout.write(JSON.stringify(res) + "\n");
    process.exit(0); // do not wait for llama.cpp's worker threads
} catch (e) {
    fail(e?.stack ?? String(e));
}

// NATS decentralised auth for the tests, made here rather than with `nsc` (Debian does
// not ship it): an operator, a system account, an account with JetStream and its users,
// as v2 JWTs signed with NKeys (the official nkeys.js), and creds files as nsc writes
// them. A nats-server in operator mode (`operator:` + `resolver: MEMORY` +
// `resolver_preload`) checks every signature itself, so a wrong JWT or seed is refused
// by the real server, not by anything of ours.
import crypto from "node:crypto";
import { createOperator, createAccount, createUser } from "nkeys.js";

const b64url = (buf) => Buffer.from(buf).toString("base64url");
const b32 = (buf) => {
  // RFC 4648 base32 without padding, as the jwt library writes the `jti`.
  const abc = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
  let bits = 0, value = 0, out = "";
  for (const byte of buf) {
    value = (value << 8) | byte; bits += 8;
    while (bits >= 5) { out += abc[(value >>> (bits - 5)) & 31]; bits -= 5; }
  }
  if (bits > 0) out += abc[(value << (5 - bits)) & 31];
  return out;
};

/** A v2 JWT for `subject` (a public key) with `nats` claims, signed by the key pair `issuer`. */
export function encodeJwt(issuer, subject, name, nats) {
  const claims = { jti: "", iat: Math.floor(Date.now() / 1000), iss: issuer.getPublicKey(), name, sub: subject, nats: { ...nats, version: 2 } };
  claims.jti = b32(crypto.createHash("sha512-256").update(JSON.stringify(claims)).digest());
  const signing = `${b64url(JSON.stringify({ typ: "JWT", alg: "ed25519-nkey" }))}.${b64url(JSON.stringify(claims))}`;
  return `${signing}.${b64url(issuer.sign(Buffer.from(signing)))}`;
}

const UNLIMITED = { subs: -1, data: -1, payload: -1, imports: -1, exports: -1, wildcards: true, conn: -1, leaf: -1 };

/** An account signed by `operator`; `jetstream` gives it unlimited JetStream storage. */
export function account(operator, name, { jetstream = false } = {}) {
  const kp = createAccount();
  const limits = { ...UNLIMITED, ...(jetstream ? { mem_storage: -1, disk_storage: -1, streams: -1, consumer: -1 } : {}) };
  const jwt = encodeJwt(operator, kp.getPublicKey(), name, { limits, default_permissions: { pub: {}, sub: {} }, type: "account" });
  return { kp, pub: kp.getPublicKey(), jwt };
}

/** A user of `acc` (its key pair signs), as the text of a creds file. */
export function userCreds(acc, name, { seedOf } = {}) {
  const kp = createUser();
  const jwt = encodeJwt(acc.kp, kp.getPublicKey(), name, { pub: {}, sub: {}, subs: -1, data: -1, payload: -1, type: "user" });
  const seed = Buffer.from((seedOf ?? kp).getSeed()).toString();
  return [
    "-----BEGIN NATS USER JWT-----", jwt, "------END NATS USER JWT------", "",
    "************************* IMPORTANT *************************",
    "NKEY Seed printed below can be used to sign and prove identity.",
    "NKEYs are sensitive and should be treated as secrets.", "",
    "-----BEGIN USER NKEY SEED-----", seed, "------END USER NKEY SEED------", "",
    "*************************************************************", "",
  ].join("\n");
}

/**
 * An operator with a system account and one JetStream account; `config` is the
 * nats-server configuration text of operator mode with both accounts preloaded.
 */
export function operatorSetup() {
  const op = createOperator();
  const sys = account(op, "SYS");
  const app = account(op, "CHAIN", { jetstream: true });
  const opJwt = encodeJwt(op, op.getPublicKey(), "poshub-test-operator", { system_account: sys.pub, type: "operator" });
  const config = (opFile) => [
    `operator: "${opFile}"`,
    `system_account: ${sys.pub}`,
    "resolver: MEMORY",
    `resolver_preload: {\n  ${sys.pub}: "${sys.jwt}"\n  ${app.pub}: "${app.jwt}"\n}`,
  ].join("\n");
  return { op, opJwt, sys, app, config };
}

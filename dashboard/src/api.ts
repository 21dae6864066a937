// The coordinator's JobService over gRPC-web, on the origin that served this page, with the bearer
// token from localStorage on every call.
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { JobService, JobState } from "./gen/bt/v1/jobs_pb";

const TOKEN_KEY = "bt.token";

export function getToken(): string {
  return localStorage.getItem(TOKEN_KEY) ?? "";
}

export function setToken(t: string): void {
  if (t) localStorage.setItem(TOKEN_KEY, t);
  else localStorage.removeItem(TOKEN_KEY);
}

const auth: Interceptor = (next) => (req) => {
  const t = getToken();
  if (t) req.header.set("authorization", `Bearer ${t}`);
  return next(req);
};

const transport = createGrpcWebTransport({
  baseUrl: location.origin,
  interceptors: [auth],
});

export const client = createClient(JobService, transport);

/** The coordinator's message for an error (the status message, without the code prefix). */
export function errorText(e: unknown): string {
  if (e instanceof ConnectError) {
    if (e.code === Code.Unauthenticated) return `${e.rawMessage}: enter a token above`;
    if (e.code === Code.PermissionDenied) return `${e.rawMessage}: this token's role may not do that`;
    return e.rawMessage || Code[e.code];
  }
  return e instanceof Error ? e.message : String(e);
}

export function isAuthError(e: unknown): boolean {
  return e instanceof ConnectError && (e.code === Code.Unauthenticated || e.code === Code.PermissionDenied);
}

export function stateName(s: JobState): string {
  return (JobState[s] ?? String(s)).toLowerCase();
}

export function isTerminal(s: JobState): boolean {
  return s === JobState.SUCCEEDED || s === JobState.FAILED || s === JobState.CANCELLED;
}

// Resource types, all taken from the generated OpenAPI types (schema.gen.ts): a server change
// to a resource shape changes these, and `tsc` reports every place the client depends on it.
import type { components, paths } from "./schema.gen";

type Schemas = components["schemas"];
export type Project = Schemas["Project"];
export type Thread = Schemas["Thread"];
export type Message = Schemas["Message"];
export type Usage = Schemas["Usage"];
export type User = Schemas["User"];
export type LoginResult = Schemas["LoginResult"];
export type ErrorBody = Schemas["ErrorBody"];
export type ProjectPage = Schemas["ProjectPage"];
export type ThreadPage = Schemas["ThreadPage"];
export type MessagePage = Schemas["MessagePage"];
export type MessageStatus = Message["status"];

type JsonOf<R> = R extends { content: { "application/json": infer B } } ? B : never;
/** The JSON body of a path's success response. */
export type ResponseOf<
  P extends keyof paths,
  M extends keyof paths[P],
  S extends number,
> = paths[P][M] extends { responses: infer R } ? (S extends keyof R ? JsonOf<R[S]> : never) : never;
/** The JSON request body of a path's operation. */
export type BodyOf<P extends keyof paths, M extends keyof paths[P]> = paths[P][M] extends {
  requestBody?: { content: { "application/json": infer B } };
}
  ? B
  : never;

// Generated from the server's OpenAPI document by web/scripts/gen-api.mjs. Do not edit:
// run `npm run gen:api` in web/ after changing server/openapi.py or its models.
export type paths = {
    "/api/v1/auth/login": {
        parameters: {
            query?: never;
            header?: never;
            path?: never;
            cookie?: never;
        };
        get?: never;
        put?: never;
        /** Log in: access token, CSRF token, tl_session and tl_csrf cookies */
        post: operations["login"];
        delete?: never;
        options?: never;
        head?: never;
        patch?: never;
        trace?: never;
    };
    "/api/v1/auth/logout": {
        parameters: {
            query?: never;
            header?: never;
            path?: never;
            cookie?: never;
        };
        get?: never;
        put?: never;
        /** Log out (the token is revoked server-side) */
        post: operations["logout"];
        delete?: never;
        options?: never;
        head?: never;
        patch?: never;
        trace?: never;
    };
    "/api/v1/auth/me": {
        parameters: {
            query?: never;
            header?: never;
            path?: never;
            cookie?: never;
        };
        /** The authenticated user (lets a client check its session) */
        get: operations["me"];
        put?: never;
        post?: never;
        delete?: never;
        options?: never;
        head?: never;
        patch?: never;
        trace?: never;
    };
    "/api/v1/auth/register": {
        parameters: {
            query?: never;
            header?: never;
            path?: never;
            cookie?: never;
        };
        get?: never;
        put?: never;
        /** Register */
        post: operations["register"];
        delete?: never;
        options?: never;
        head?: never;
        patch?: never;
        trace?: never;
    };
    "/api/v1/messages/{message_id}": {
        parameters: {
            query?: never;
            header?: never;
            path: {
                message_id: string;
            };
            cookie?: never;
        };
        /** Get a message */
        get: operations["getMessage"];
        put?: never;
        post?: never;
        /** Soft-delete a message at a version (returns the tombstone) */
        delete: operations["deleteMessage"];
        options?: never;
        head?: never;
        /** Edit a message at a version */
        patch: operations["editMessage"];
        trace?: never;
    };
    "/api/v1/messages/{message_id}/history": {
        parameters: {
            query?: never;
            header?: never;
            path: {
                message_id: string;
            };
            cookie?: never;
        };
        /** Every edit and delete of a message */
        get: operations["getMessageHistory"];
        put?: never;
        post?: never;
        delete?: never;
        options?: never;
        head?: never;
        patch?: never;
        trace?: never;
    };
    "/api/v1/projects": {
        parameters: {
            query?: never;
            header?: never;
            path?: never;
            cookie?: never;
        };
        /** List your projects (oldest first) */
        get: operations["listProjects"];
        put?: never;
        /** Create a project */
        post: operations["createProject"];
        delete?: never;
        options?: never;
        head?: never;
        patch?: never;
        trace?: never;
    };
    "/api/v1/projects/{project_id}": {
        parameters: {
            query?: never;
            header?: never;
            path: {
                project_id: string;
            };
            cookie?: never;
        };
        /** Get a project */
        get: operations["getProject"];
        put?: never;
        post?: never;
        /** Delete a project with its threads */
        delete: operations["deleteProject"];
        options?: never;
        head?: never;
        /** Change a project's name or budget (null budget = no limit) */
        patch: operations["updateProject"];
        trace?: never;
    };
    "/api/v1/projects/{project_id}/threads": {
        parameters: {
            query?: never;
            header?: never;
            path: {
                project_id: string;
            };
            cookie?: never;
        };
        /** List a project's threads (oldest first) */
        get: operations["listThreads"];
        put?: never;
        /** Create a thread */
        post: operations["createThread"];
        delete?: never;
        options?: never;
        head?: never;
        patch?: never;
        trace?: never;
    };
    "/api/v1/projects/{project_id}/usage": {
        parameters: {
            query?: never;
            header?: never;
            path: {
                project_id: string;
            };
            cookie?: never;
        };
        /** Token usage and cost */
        get: operations["getProjectUsage"];
        put?: never;
        post?: never;
        delete?: never;
        options?: never;
        head?: never;
        patch?: never;
        trace?: never;
    };
    "/api/v1/threads/{thread_id}": {
        parameters: {
            query?: never;
            header?: never;
            path: {
                thread_id: string;
            };
            cookie?: never;
        };
        /** Get a thread */
        get: operations["getThread"];
        put?: never;
        post?: never;
        /** Delete a thread with its messages */
        delete: operations["deleteThread"];
        options?: never;
        head?: never;
        /** Rename a thread */
        patch: operations["updateThread"];
        trace?: never;
    };
    "/api/v1/threads/{thread_id}/messages": {
        parameters: {
            query?: never;
            header?: never;
            path: {
                thread_id: string;
            };
            cookie?: never;
        };
        /** List messages by seq (tombstones included) */
        get: operations["listMessages"];
        put?: never;
        /** Send a message (idempotent by client_msg_id) */
        post: operations["sendMessage"];
        delete?: never;
        options?: never;
        head?: never;
        patch?: never;
        trace?: never;
    };
};
export type webhooks = Record<string, never>;
export type components = {
    schemas: {
        /**
         * CreateProjectBody
         * @description ``POST /api/v1/projects``.
         */
        CreateProjectBody: {
            /**
             * Monthly Budget Usd
             * @default null
             */
            monthly_budget_usd?: number | string | null;
            /** Name */
            name: string;
        };
        /**
         * CreateThreadBody
         * @description ``POST /api/v1/projects/{id}/threads``.
         */
        CreateThreadBody: {
            /**
             * Title
             * @default
             */
            title?: string;
        };
        /**
         * DeleteMessageBody
         * @description ``DELETE /api/v1/messages/{id}`` and WebSocket ``delete``.
         */
        DeleteMessageBody: {
            /** Expected Version */
            expected_version?: number;
        };
        /**
         * EditMessageBody
         * @description ``PATCH /api/v1/messages/{id}`` and WebSocket ``edit``.
         */
        EditMessageBody: {
            /** Content */
            content: string;
            /** Expected Version */
            expected_version?: number;
        };
        /**
         * ErrorBody
         * @description What went wrong: a stable snake_case ``code``, a message for a person, and details.
         */
        ErrorBody: {
            /** Code */
            code: string;
            /** Details */
            details: {
                [key: string]: unknown;
            };
            /** Message */
            message: string;
            /** Request Id */
            request_id: string | null;
        } & {
            [key: string]: unknown;
        };
        /**
         * ErrorEnvelope
         * @description Every non-2xx body.
         */
        ErrorEnvelope: {
            error: components["schemas"]["ErrorBody"];
        } & {
            [key: string]: unknown;
        };
        /**
         * HistoryEntry
         * @description One edit or delete of a message.
         */
        HistoryEntry: {
            /**
             * Created At
             * Format: date-time
             */
            created_at: string;
            /**
             * Editor Id
             * @description user who made the change
             */
            editor_id: string | null;
            /**
             * Kind
             * @enum {string}
             */
            kind: "edit" | "delete";
            /**
             * New Content
             * @description null for a delete
             */
            new_content: string | null;
            /** Old Content */
            old_content: string;
            /**
             * Version
             * @description the version this change produced
             */
            version: number;
        } & {
            [key: string]: unknown;
        };
        /** HistoryPage */
        HistoryPage: {
            /** Items */
            items: components["schemas"]["HistoryEntry"][];
            /** Next Cursor */
            next_cursor: string | null;
        } & {
            [key: string]: unknown;
        };
        /**
         * LoginResult
         * @description A login: the user, the access token (also set as ``tl_session``) and the CSRF token.
         */
        LoginResult: {
            /** Access Token */
            access_token: string;
            /** Csrf Token */
            csrf_token: string;
            user: components["schemas"]["User"];
        } & {
            [key: string]: unknown;
        };
        /**
         * Message
         * @description A message. A deleted one is a tombstone: ``deleted`` true, ``content`` "".
         */
        Message: {
            /** Client Msg Id */
            client_msg_id: string | null;
            /** Content */
            content: string;
            /**
             * Created At
             * Format: date-time
             */
            created_at: string;
            /** Deleted */
            deleted: boolean;
            /** Deleted At */
            deleted_at: string | null;
            /** Edited At */
            edited_at: string | null;
            /** Id */
            id: string;
            /** Model */
            model: string | null;
            /** Reply To */
            reply_to: string | null;
            /**
             * Role
             * @enum {string}
             */
            role: "user" | "assistant" | "system";
            /** Seq */
            seq: number;
            /**
             * Status
             * @enum {string}
             */
            status: "streaming" | "completed" | "cancelled" | "failed" | "interrupted";
            /** Thread Id */
            thread_id: string;
            /** Version */
            version: number;
        } & {
            [key: string]: unknown;
        };
        /** MessagePage */
        MessagePage: {
            /** Items */
            items: components["schemas"]["Message"][];
            /** Next Cursor */
            next_cursor: string | null;
        } & {
            [key: string]: unknown;
        };
        /**
         * ModelUsage
         * @description Tokens and cost of one model.
         */
        ModelUsage: {
            /** Completion Tokens */
            completion_tokens: number;
            /** Cost Usd */
            cost_usd: number;
            /** Model */
            model: string;
            /** Prompt Tokens */
            prompt_tokens: number;
        } & {
            [key: string]: unknown;
        };
        /**
         * Project
         * @description A project. ``monthly_budget_usd`` null = no limit.
         */
        Project: {
            /**
             * Created At
             * Format: date-time
             */
            created_at: string;
            /** Id */
            id: string;
            /** Monthly Budget Usd */
            monthly_budget_usd: number | null;
            /** Name */
            name: string;
            /**
             * Spend This Month Usd
             * @description USD this calendar month (UTC), in flight included
             */
            spend_this_month_usd: number;
            /**
             * Updated At
             * Format: date-time
             */
            updated_at: string;
        } & {
            [key: string]: unknown;
        };
        /** ProjectPage */
        ProjectPage: {
            /** Items */
            items: components["schemas"]["Project"][];
            /** Next Cursor */
            next_cursor: string | null;
        } & {
            [key: string]: unknown;
        };
        /**
         * SendMessageBody
         * @description ``POST /api/v1/threads/{id}/messages`` and WebSocket ``send``.
         *
         *     ``client_msg_id`` makes the send idempotent within the thread; ``reply`` asks the assistant
         *     to answer. Clients may only send ``role`` "user".
         */
        SendMessageBody: {
            /**
             * Client Msg Id
             * @default null
             */
            client_msg_id?: string | null;
            /** Content */
            content: string;
            /**
             * Reply
             * @default true
             */
            reply?: boolean;
            /**
             * Role
             * @default user
             * @constant
             */
            role?: "user";
        };
        /**
         * Thread
         * @description A thread of messages.
         */
        Thread: {
            /**
             * Created At
             * Format: date-time
             */
            created_at: string;
            /** Id */
            id: string;
            /** Last Message At */
            last_message_at: string | null;
            /**
             * Last Seq
             * @description seq of the thread's latest durable event
             */
            last_seq: number;
            /**
             * Message Count
             * @description messages not deleted
             */
            message_count: number;
            /** Project Id */
            project_id: string;
            /** Title */
            title: string;
            /**
             * Updated At
             * Format: date-time
             */
            updated_at: string;
        } & {
            [key: string]: unknown;
        };
        /** ThreadPage */
        ThreadPage: {
            /** Items */
            items: components["schemas"]["Thread"][];
            /** Next Cursor */
            next_cursor: string | null;
        } & {
            [key: string]: unknown;
        };
        /**
         * UpdateProjectBody
         * @description ``PATCH /api/v1/projects/{id}``: only the fields present change; null budget = no limit.
         */
        UpdateProjectBody: {
            /**
             * Monthly Budget Usd
             * @default null
             */
            monthly_budget_usd?: number | string | null;
            /**
             * Name
             * @default null
             */
            name?: string | null;
        };
        /**
         * UpdateThreadBody
         * @description ``PATCH /api/v1/threads/{id}``.
         */
        UpdateThreadBody: {
            /** Title */
            title: string;
        };
        /**
         * Usage
         * @description Usage of a project: this month (UTC), in total, and in total per model.
         */
        Usage: {
            /** By Model */
            by_model: components["schemas"]["ModelUsage"][];
            month: components["schemas"]["UsageFigures"];
            total: components["schemas"]["UsageFigures"];
        } & {
            [key: string]: unknown;
        };
        /**
         * UsageFigures
         * @description Tokens and cost.
         */
        UsageFigures: {
            /** Completion Tokens */
            completion_tokens: number;
            /** Cost Usd */
            cost_usd: number;
            /** Prompt Tokens */
            prompt_tokens: number;
        } & {
            [key: string]: unknown;
        };
        /**
         * User
         * @description An account as its owner sees it.
         */
        User: {
            /** Email */
            email: string;
            /** Id */
            id: string;
        } & {
            [key: string]: unknown;
        };
        /**
         * UserEnvelope
         * @description ``{"user": ...}`` (register, me).
         */
        UserEnvelope: {
            user: components["schemas"]["User"];
        } & {
            [key: string]: unknown;
        };
    };
    responses: never;
    parameters: never;
    requestBodies: never;
    headers: never;
    pathItems: never;
};
export type $defs = Record<string, never>;
export interface operations {
    login: {
        parameters: {
            query?: never;
            header?: never;
            path?: never;
            cookie?: never;
        };
        requestBody: {
            content: {
                "application/json": {
                    email: string;
                    password: string;
                };
            };
        };
        responses: {
            /** @description {user, access_token, csrf_token} */
            200: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["LoginResult"];
                };
            };
            /** @description error envelope */
            default: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["ErrorEnvelope"];
                };
            };
        };
    };
    logout: {
        parameters: {
            query?: never;
            header?: never;
            path?: never;
            cookie?: never;
        };
        requestBody?: never;
        responses: {
            /** @description logged out */
            204: {
                headers: {
                    [name: string]: unknown;
                };
                content?: never;
            };
            /** @description error envelope */
            default: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["ErrorEnvelope"];
                };
            };
        };
    };
    me: {
        parameters: {
            query?: never;
            header?: never;
            path?: never;
            cookie?: never;
        };
        requestBody?: never;
        responses: {
            /** @description {user} */
            200: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["UserEnvelope"];
                };
            };
            /** @description error envelope */
            default: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["ErrorEnvelope"];
                };
            };
        };
    };
    register: {
        parameters: {
            query?: never;
            header?: never;
            path?: never;
            cookie?: never;
        };
        requestBody: {
            content: {
                "application/json": {
                    email: string;
                    password: string;
                };
            };
        };
        responses: {
            /** @description {user} */
            201: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["UserEnvelope"];
                };
            };
            /** @description error envelope */
            default: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["ErrorEnvelope"];
                };
            };
        };
    };
    getMessage: {
        parameters: {
            query?: never;
            header?: never;
            path: {
                message_id: string;
            };
            cookie?: never;
        };
        requestBody?: never;
        responses: {
            /** @description the message */
            200: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["Message"];
                };
            };
            /** @description error envelope; codes: bad_request 400, validation_failed 422, unauthorized 401, forbidden 403, csrf_failed 403, not_found 404, version_conflict 409, idempotency_conflict 409, conflict 409, rate_limited 429, budget_exceeded 402, payload_too_large 413, unavailable 503, internal 500 */
            default: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["ErrorEnvelope"];
                };
            };
        };
    };
    deleteMessage: {
        parameters: {
            query?: never;
            header?: {
                /** @description the version you read (or expected_version in the body); one is required */
                "If-Match"?: string;
            };
            path: {
                message_id: string;
            };
            cookie?: never;
        };
        requestBody?: {
            content: {
                "application/json": components["schemas"]["DeleteMessageBody"];
            };
        };
        responses: {
            /** @description the message */
            200: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["Message"];
                };
            };
            /** @description error envelope; codes: bad_request 400, validation_failed 422, unauthorized 401, forbidden 403, csrf_failed 403, not_found 404, version_conflict 409, idempotency_conflict 409, conflict 409, rate_limited 429, budget_exceeded 402, payload_too_large 413, unavailable 503, internal 500 */
            default: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["ErrorEnvelope"];
                };
            };
        };
    };
    editMessage: {
        parameters: {
            query?: never;
            header?: {
                /** @description the version you read (or expected_version in the body); one is required */
                "If-Match"?: string;
            };
            path: {
                message_id: string;
            };
            cookie?: never;
        };
        requestBody: {
            content: {
                "application/json": components["schemas"]["EditMessageBody"];
            };
        };
        responses: {
            /** @description the message */
            200: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["Message"];
                };
            };
            /** @description error envelope; codes: bad_request 400, validation_failed 422, unauthorized 401, forbidden 403, csrf_failed 403, not_found 404, version_conflict 409, idempotency_conflict 409, conflict 409, rate_limited 429, budget_exceeded 402, payload_too_large 413, unavailable 503, internal 500 */
            default: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["ErrorEnvelope"];
                };
            };
        };
    };
    getMessageHistory: {
        parameters: {
            query?: {
                /** @description the previous page's next_cursor (opaque) */
                cursor?: string;
                /** @description page size */
                limit?: number;
            };
            header?: never;
            path: {
                message_id: string;
            };
            cookie?: never;
        };
        requestBody?: never;
        responses: {
            /** @description a page */
            200: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["HistoryPage"];
                };
            };
            /** @description error envelope; codes: bad_request 400, validation_failed 422, unauthorized 401, forbidden 403, csrf_failed 403, not_found 404, version_conflict 409, idempotency_conflict 409, conflict 409, rate_limited 429, budget_exceeded 402, payload_too_large 413, unavailable 503, internal 500 */
            default: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["ErrorEnvelope"];
                };
            };
        };
    };
    listProjects: {
        parameters: {
            query?: {
                /** @description the previous page's next_cursor (opaque) */
                cursor?: string;
                /** @description page size */
                limit?: number;
            };
            header?: never;
            path?: never;
            cookie?: never;
        };
        requestBody?: never;
        responses: {
            /** @description a page */
            200: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["ProjectPage"];
                };
            };
            /** @description error envelope; codes: bad_request 400, validation_failed 422, unauthorized 401, forbidden 403, csrf_failed 403, not_found 404, version_conflict 409, idempotency_conflict 409, conflict 409, rate_limited 429, budget_exceeded 402, payload_too_large 413, unavailable 503, internal 500 */
            default: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["ErrorEnvelope"];
                };
            };
        };
    };
    createProject: {
        parameters: {
            query?: never;
            header?: never;
            path?: never;
            cookie?: never;
        };
        requestBody: {
            content: {
                "application/json": components["schemas"]["CreateProjectBody"];
            };
        };
        responses: {
            /** @description the project */
            201: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["Project"];
                };
            };
            /** @description error envelope; codes: bad_request 400, validation_failed 422, unauthorized 401, forbidden 403, csrf_failed 403, not_found 404, version_conflict 409, idempotency_conflict 409, conflict 409, rate_limited 429, budget_exceeded 402, payload_too_large 413, unavailable 503, internal 500 */
            default: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["ErrorEnvelope"];
                };
            };
        };
    };
    getProject: {
        parameters: {
            query?: never;
            header?: never;
            path: {
                project_id: string;
            };
            cookie?: never;
        };
        requestBody?: never;
        responses: {
            /** @description the project */
            200: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["Project"];
                };
            };
            /** @description error envelope; codes: bad_request 400, validation_failed 422, unauthorized 401, forbidden 403, csrf_failed 403, not_found 404, version_conflict 409, idempotency_conflict 409, conflict 409, rate_limited 429, budget_exceeded 402, payload_too_large 413, unavailable 503, internal 500 */
            default: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["ErrorEnvelope"];
                };
            };
        };
    };
    deleteProject: {
        parameters: {
            query?: never;
            header?: never;
            path: {
                project_id: string;
            };
            cookie?: never;
        };
        requestBody?: never;
        responses: {
            /** @description no content */
            204: {
                headers: {
                    [name: string]: unknown;
                };
                content?: never;
            };
            /** @description error envelope; codes: bad_request 400, validation_failed 422, unauthorized 401, forbidden 403, csrf_failed 403, not_found 404, version_conflict 409, idempotency_conflict 409, conflict 409, rate_limited 429, budget_exceeded 402, payload_too_large 413, unavailable 503, internal 500 */
            default: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["ErrorEnvelope"];
                };
            };
        };
    };
    updateProject: {
        parameters: {
            query?: never;
            header?: never;
            path: {
                project_id: string;
            };
            cookie?: never;
        };
        requestBody: {
            content: {
                "application/json": components["schemas"]["UpdateProjectBody"];
            };
        };
        responses: {
            /** @description the project */
            200: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["Project"];
                };
            };
            /** @description error envelope; codes: bad_request 400, validation_failed 422, unauthorized 401, forbidden 403, csrf_failed 403, not_found 404, version_conflict 409, idempotency_conflict 409, conflict 409, rate_limited 429, budget_exceeded 402, payload_too_large 413, unavailable 503, internal 500 */
            default: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["ErrorEnvelope"];
                };
            };
        };
    };
    listThreads: {
        parameters: {
            query?: {
                /** @description the previous page's next_cursor (opaque) */
                cursor?: string;
                /** @description page size */
                limit?: number;
            };
            header?: never;
            path: {
                project_id: string;
            };
            cookie?: never;
        };
        requestBody?: never;
        responses: {
            /** @description a page */
            200: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["ThreadPage"];
                };
            };
            /** @description error envelope; codes: bad_request 400, validation_failed 422, unauthorized 401, forbidden 403, csrf_failed 403, not_found 404, version_conflict 409, idempotency_conflict 409, conflict 409, rate_limited 429, budget_exceeded 402, payload_too_large 413, unavailable 503, internal 500 */
            default: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["ErrorEnvelope"];
                };
            };
        };
    };
    createThread: {
        parameters: {
            query?: never;
            header?: never;
            path: {
                project_id: string;
            };
            cookie?: never;
        };
        requestBody?: {
            content: {
                "application/json": components["schemas"]["CreateThreadBody"];
            };
        };
        responses: {
            /** @description the thread */
            201: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["Thread"];
                };
            };
            /** @description error envelope; codes: bad_request 400, validation_failed 422, unauthorized 401, forbidden 403, csrf_failed 403, not_found 404, version_conflict 409, idempotency_conflict 409, conflict 409, rate_limited 429, budget_exceeded 402, payload_too_large 413, unavailable 503, internal 500 */
            default: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["ErrorEnvelope"];
                };
            };
        };
    };
    getProjectUsage: {
        parameters: {
            query?: never;
            header?: never;
            path: {
                project_id: string;
            };
            cookie?: never;
        };
        requestBody?: never;
        responses: {
            /** @description usage */
            200: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["Usage"];
                };
            };
            /** @description error envelope; codes: bad_request 400, validation_failed 422, unauthorized 401, forbidden 403, csrf_failed 403, not_found 404, version_conflict 409, idempotency_conflict 409, conflict 409, rate_limited 429, budget_exceeded 402, payload_too_large 413, unavailable 503, internal 500 */
            default: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["ErrorEnvelope"];
                };
            };
        };
    };
    getThread: {
        parameters: {
            query?: never;
            header?: never;
            path: {
                thread_id: string;
            };
            cookie?: never;
        };
        requestBody?: never;
        responses: {
            /** @description the thread */
            200: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["Thread"];
                };
            };
            /** @description error envelope; codes: bad_request 400, validation_failed 422, unauthorized 401, forbidden 403, csrf_failed 403, not_found 404, version_conflict 409, idempotency_conflict 409, conflict 409, rate_limited 429, budget_exceeded 402, payload_too_large 413, unavailable 503, internal 500 */
            default: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["ErrorEnvelope"];
                };
            };
        };
    };
    deleteThread: {
        parameters: {
            query?: never;
            header?: never;
            path: {
                thread_id: string;
            };
            cookie?: never;
        };
        requestBody?: never;
        responses: {
            /** @description no content */
            204: {
                headers: {
                    [name: string]: unknown;
                };
                content?: never;
            };
            /** @description error envelope; codes: bad_request 400, validation_failed 422, unauthorized 401, forbidden 403, csrf_failed 403, not_found 404, version_conflict 409, idempotency_conflict 409, conflict 409, rate_limited 429, budget_exceeded 402, payload_too_large 413, unavailable 503, internal 500 */
            default: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["ErrorEnvelope"];
                };
            };
        };
    };
    updateThread: {
        parameters: {
            query?: never;
            header?: never;
            path: {
                thread_id: string;
            };
            cookie?: never;
        };
        requestBody: {
            content: {
                "application/json": components["schemas"]["UpdateThreadBody"];
            };
        };
        responses: {
            /** @description the thread */
            200: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["Thread"];
                };
            };
            /** @description error envelope; codes: bad_request 400, validation_failed 422, unauthorized 401, forbidden 403, csrf_failed 403, not_found 404, version_conflict 409, idempotency_conflict 409, conflict 409, rate_limited 429, budget_exceeded 402, payload_too_large 413, unavailable 503, internal 500 */
            default: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["ErrorEnvelope"];
                };
            };
        };
    };
    listMessages: {
        parameters: {
            query?: {
                /** @description messages with a greater seq */
                after_seq?: number;
                /** @description the page just before this seq */
                before_seq?: number;
                /** @description the previous page's next_cursor (opaque) */
                cursor?: string;
                /** @description page size */
                limit?: number;
            };
            header?: never;
            path: {
                thread_id: string;
            };
            cookie?: never;
        };
        requestBody?: never;
        responses: {
            /** @description a page */
            200: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["MessagePage"];
                };
            };
            /** @description error envelope; codes: bad_request 400, validation_failed 422, unauthorized 401, forbidden 403, csrf_failed 403, not_found 404, version_conflict 409, idempotency_conflict 409, conflict 409, rate_limited 429, budget_exceeded 402, payload_too_large 413, unavailable 503, internal 500 */
            default: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["ErrorEnvelope"];
                };
            };
        };
    };
    sendMessage: {
        parameters: {
            query?: never;
            header?: never;
            path: {
                thread_id: string;
            };
            cookie?: never;
        };
        requestBody: {
            content: {
                "application/json": components["schemas"]["SendMessageBody"];
            };
        };
        responses: {
            /** @description the first message of this client_msg_id */
            200: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["Message"];
                };
            };
            /** @description the message */
            201: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["Message"];
                };
            };
            /** @description error envelope; codes: bad_request 400, validation_failed 422, unauthorized 401, forbidden 403, csrf_failed 403, not_found 404, version_conflict 409, idempotency_conflict 409, conflict 409, rate_limited 429, budget_exceeded 402, payload_too_large 413, unavailable 503, internal 500 */
            default: {
                headers: {
                    [name: string]: unknown;
                };
                content: {
                    "application/json": components["schemas"]["ErrorEnvelope"];
                };
            };
        };
    };
}

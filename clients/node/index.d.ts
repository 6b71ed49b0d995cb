// Types of noomnim-client (see README.md and docs/PROTOCOL.md of Noomnim Chat).

/** A stored message, as `message_sent` and history carry it. */
export interface Message {
  _id: string;
  group_name: string;
  username: string;
  /** Absent in a tombstone (`deleted: true`). */
  text?: string;
  timestamp: string;
  seq: number;
  client_msg_id?: string;
  edited_at?: string;
  deleted?: boolean;
  duplicate?: boolean;
  mentions?: string[];
  /** The seq of the thread's root this message answers. */
  reply_to?: number;
  /** A thread root's replies that are not deleted, and the newest of them. */
  reply_count?: number;
  last_reply_seq?: number;
}

/** Any line from the server. */
export interface Line {
  event: string;
  data?: any;
  id?: number | string;
}

export interface ClientOptions {
  /** A JWT for servers with AUTH_SECRET. */
  token?: string;
  /** Every unsolicited line that is not a message (presence, typing, edits, removals...). */
  onEvent?: (line: Line) => void;
}

/** A request the server refused; `code` is its stable machine code. */
export class ChatError extends Error {
  code: string;
  constructor(code: string, text: string);
}

export class Client {
  constructor(
    host: string,
    port: number,
    username: string,
    onMessage?: (message: Message) => void,
    options?: ClientOptions,
  );
  /** group -> { last_seq, unread_count }, kept current from group_activity and read_marker. */
  groups: Map<string, { last_seq?: number; unread_count: number }>;
  /** The protocol version the server agreed to (3 when it has it). */
  protocol: number;
  onEvent: ((line: Line) => void) | null;
  /** Set once the server closed with `account_erased`: connect() then rejects with it. */
  endedForGood: ChatError | null;
  /** (Re)connects: hello, log in, re-enter the room and catch up, resend the outbox. Rejects
   * with ChatError `account_erased` once the account was erased (a new login would register
   * the name anew). */
  connect(): Promise<void>;
  request(event: string, data?: object): Promise<Line>;
  joinAndEnter(group: string): Promise<void>;
  enter(group: string): Promise<void>;
  /** Resolves with the stored message; safe across reconnects (sent with a client_msg_id). */
  send(group: string, text: string, mentions?: string[], replyTo?: number | null): Promise<Message>;
  thread(group: string, seq: number, afterSeq?: number, limit?: number): Promise<{ messages: Message[]; has_more: boolean }>;
  openDirect(username: string): Promise<string>;
  block(username: string): Promise<string[]>;
  unblock(username: string): Promise<string[]>;
  blocked(): Promise<string[]>;
  setNotify(group: string, level: 'all' | 'mentions' | 'none'): Promise<void>;
  edit(group: string, seq: number, text: string): Promise<Message>;
  delete(group: string, seq: number): Promise<Message>;
  markRead(group: string, seq: number): Promise<{ group_name: string; last_read_seq: number; unread_count: number }>;
  typing(group: string): Promise<void>;
  close(): void;
}

export function scenario(options: object): Promise<boolean>;

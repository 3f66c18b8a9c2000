"""The PostgreSQL schema of the relay store, as migration steps (``store/migrations.py`` lists them).

PostgreSQL stores start at version 2 (store v2): version 1, the first slice, never ran on
PostgreSQL, so its PostgreSQL steps are empty and version 2 creates the whole schema. Everything
lives in the schema named by the store URL (``search_path``).

Locking, the same order in every function, so that no two transactions wait for each other in a
cycle: ``sent`` rows (sorted by sender, msg_id) -> ``mailbox_heads`` rows (sorted by recipient) ->
``bodies`` rows (sorted by id) -> ``usage`` rows (sorted by sender) -> one ``disk_usage`` shard.
A recipient's ``mailbox_senders`` rows and messages are only written by a holder of its head lock.
The head lock is held until COMMIT, so each recipient's seqs commit in order and without gaps.
"""

from __future__ import annotations

DISK_SHARDS = 16  # rows of the disk-usage counter; a transaction locks one, last

POSTGRES_V2: tuple[str, ...] = (
    """
CREATE TABLE accounts (
    username TEXT PRIMARY KEY,
    identity BYTEA NOT NULL,
    created_ms BIGINT NOT NULL,
    signed_prekey BYTEA,
    kem_last_resort BYTEA,
    state TEXT NOT NULL DEFAULT 'active',
    skeleton TEXT UNIQUE,
    recovery_public BYTEA,
    login_counter BIGINT NOT NULL DEFAULT 0,
    state_changed_ms BIGINT,
    state_by TEXT,
    state_reason TEXT
);
CREATE TABLE invites (
    token_hash BYTEA PRIMARY KEY,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL
);
CREATE TABLE one_time_prekeys (
    username TEXT NOT NULL,
    kind SMALLINT NOT NULL,
    key_id BIGINT NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (username, kind, key_id)
);
CREATE TABLE reserved_names (
    name TEXT PRIMARY KEY,
    skeleton TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE INDEX reserved_by_skeleton ON reserved_names (skeleton);
CREATE TABLE account_events (
    id BIGSERIAL PRIMARY KEY,
    ts BIGINT NOT NULL,
    username TEXT NOT NULL,
    action TEXT NOT NULL,
    actor TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE blocks (
    owner TEXT NOT NULL,
    blocked TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (owner, blocked)
);
CREATE INDEX blocks_by_blocked ON blocks (blocked);
CREATE TABLE mailbox_heads (
    recipient TEXT PRIMARY KEY,
    next_seq BIGINT NOT NULL DEFAULT 1,
    queued INTEGER NOT NULL DEFAULT 0,
    bytes BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE mailbox_senders (
    recipient TEXT NOT NULL,
    sender TEXT NOT NULL,
    queued INTEGER NOT NULL,
    bytes BIGINT NOT NULL,
    PRIMARY KEY (recipient, sender)
);
CREATE INDEX mailbox_senders_by_sender ON mailbox_senders (sender);
CREATE TABLE bodies (
    id BIGSERIAL PRIMARY KEY,
    body BYTEA NOT NULL,
    refs INTEGER NOT NULL
);
CREATE TABLE messages (
    recipient TEXT NOT NULL,
    seq BIGINT NOT NULL,
    sender TEXT NOT NULL,
    msg_id BYTEA NOT NULL,
    kind TEXT NOT NULL,
    ts BIGINT NOT NULL,
    size INTEGER NOT NULL,
    body BYTEA,
    body_id BIGINT,
    PRIMARY KEY (recipient, seq),
    CHECK ((body IS NULL) <> (body_id IS NULL))
);
CREATE TABLE sent (
    sender TEXT NOT NULL,
    msg_id BYTEA NOT NULL,
    ts BIGINT NOT NULL,
    recipients TEXT[] NOT NULL DEFAULT '{}',
    seqs BIGINT[] NOT NULL DEFAULT '{}',
    PRIMARY KEY (sender, msg_id)
);
CREATE INDEX sent_by_ts ON sent (ts);
CREATE TABLE usage (
    sender TEXT NOT NULL,
    hour BIGINT NOT NULL,
    messages BIGINT NOT NULL,
    bytes BIGINT NOT NULL,
    PRIMARY KEY (sender, hour)
);
CREATE TABLE disk_usage (shard SMALLINT PRIMARY KEY, bytes BIGINT NOT NULL);
INSERT INTO disk_usage SELECT s, 0 FROM generate_series(0, 15) AS s;
CREATE TABLE epoch (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    value BYTEA NOT NULL,
    created_ms BIGINT NOT NULL
);
""",
    # Sends: a batch of deliveries in one transaction (a group commit). Statuses: 0 accepted (seq
    # NULL: dropped by a block), 1 duplicate, 2 unknown user, 3 suspended, 4 mailbox full,
    # 5 sender cap, 6 quota exceeded. Recipients are flattened: delivery d owns
    # p_rcpts[p_first[d] .. p_first[d] + p_count[d] - 1].
    """
CREATE FUNCTION cp_enqueue(p_senders TEXT[], p_ids BYTEA[], p_kinds TEXT[], p_bodies BYTEA[], p_ts BIGINT[],
                           p_first INTEGER[], p_count INTEGER[], p_rcpts TEXT[],
                           p_max_queue INTEGER[], p_max_per_sender INTEGER[], p_max_bytes BIGINT[],
                           p_budget BIGINT[])
RETURNS TABLE (didx INTEGER, ridx INTEGER, status SMALLINT, seq BIGINT) LANGUAGE plpgsql AS $$
#variable_conflict error
DECLARE
    d INTEGER;
    r INTEGER;
    v_rcpt TEXT;
    v_sender TEXT;
    v_size INTEGER;
    v_state TEXT;
    h_next BIGINT;
    h_queued INTEGER;
    h_bytes BIGINT;
    s_queued INTEGER;
    v_prior_rcpts TEXT[];
    v_prior_seqs BIGINT[];
    v_pos INTEGER;
    v_body BIGINT;
    v_stored INTEGER;
    v_disk BIGINT := 0;
    v_new_disk BIGINT := 0;
    u_senders TEXT[] := '{}';
    u_bytes BIGINT[] := '{}';
    u_hours BIGINT[] := '{}';
    v_shard SMALLINT := floor(random() * 16)::SMALLINT;
BEGIN
    -- 1. dedup rows, sorted
    FOR d IN SELECT t.ord FROM unnest(p_senders, p_ids) WITH ORDINALITY AS t(s, i, ord) ORDER BY t.s, t.i
    LOOP
        INSERT INTO sent AS x (sender, msg_id, ts) VALUES (p_senders[d], p_ids[d], p_ts[d])
            ON CONFLICT DO NOTHING;
        PERFORM 1 FROM sent x WHERE x.sender = p_senders[d] AND x.msg_id = p_ids[d] FOR UPDATE;
    END LOOP;
    -- 2. every recipient's head, sorted; held until COMMIT
    PERFORM 1 FROM mailbox_heads h WHERE h.recipient = ANY(p_rcpts) ORDER BY h.recipient FOR UPDATE;
    IF EXISTS (SELECT 1 FROM unnest(p_budget) AS b(v) WHERE b.v IS NOT NULL) THEN
        SELECT coalesce(sum(u.bytes), 0) INTO v_disk FROM disk_usage u;
    END IF;
    -- 3. each delivery, each recipient, in the order given
    FOR d IN 1 .. coalesce(array_length(p_senders, 1), 0) LOOP
        v_sender := p_senders[d];
        v_size := length(p_bodies[d]);
        v_body := NULL;
        v_stored := 0;
        SELECT x.recipients, x.seqs INTO v_prior_rcpts, v_prior_seqs FROM sent x
            WHERE x.sender = v_sender AND x.msg_id = p_ids[d];
        FOR r IN p_first[d] .. p_first[d] + p_count[d] - 1 LOOP
            v_rcpt := p_rcpts[r];
            didx := d; ridx := r; seq := NULL;
            v_pos := array_position(v_prior_rcpts, v_rcpt);
            IF v_pos IS NOT NULL THEN
                status := 1; seq := nullif(v_prior_seqs[v_pos], 0); RETURN NEXT; CONTINUE;
            END IF;
            SELECT a.state INTO v_state FROM accounts a WHERE a.username = v_rcpt;
            IF NOT FOUND THEN status := 2; RETURN NEXT; CONTINUE; END IF;
            IF v_state <> 'active' THEN status := 3; RETURN NEXT; CONTINUE; END IF;
            IF EXISTS (SELECT 1 FROM blocks b WHERE b.owner = v_rcpt AND b.blocked = v_sender) THEN
                v_prior_rcpts := v_prior_rcpts || v_rcpt; v_prior_seqs := v_prior_seqs || 0::BIGINT;
                u_senders := u_senders || v_sender; u_bytes := u_bytes || v_size::BIGINT;
                u_hours := u_hours || (p_ts[d] / 3600000);  -- counted as delivered: the sender cannot tell
                status := 0; RETURN NEXT; CONTINUE;
            END IF;
            SELECT h.next_seq, h.queued, h.bytes INTO h_next, h_queued, h_bytes FROM mailbox_heads h
                WHERE h.recipient = v_rcpt;
            IF h_queued >= p_max_queue[d] THEN status := 4; RETURN NEXT; CONTINUE; END IF;
            SELECT s.queued INTO s_queued FROM mailbox_senders s
                WHERE s.recipient = v_rcpt AND s.sender = v_sender;
            IF FOUND AND s_queued >= p_max_per_sender[d] THEN status := 5; RETURN NEXT; CONTINUE; END IF;
            IF h_bytes + v_size > p_max_bytes[d] THEN status := 6; RETURN NEXT; CONTINUE; END IF;
            IF p_budget[d] IS NOT NULL AND v_stored = 0 AND v_disk + v_new_disk + v_size > p_budget[d] THEN
                status := 6; RETURN NEXT; CONTINUE;
            END IF;
            seq := h_next;
            UPDATE mailbox_heads h SET next_seq = h_next + 1, queued = h_queued + 1, bytes = h_bytes + v_size
                WHERE h.recipient = v_rcpt;
            INSERT INTO mailbox_senders AS s (recipient, sender, queued, bytes)
                VALUES (v_rcpt, v_sender, 1, v_size)
                ON CONFLICT (recipient, sender) DO UPDATE SET queued = s.queued + 1, bytes = s.bytes + v_size;
            IF p_count[d] = 1 THEN
                INSERT INTO messages AS m (recipient, seq, sender, msg_id, kind, ts, size, body)
                    VALUES (v_rcpt, h_next, v_sender, p_ids[d], p_kinds[d], p_ts[d], v_size, p_bodies[d]);
            ELSE
                IF v_body IS NULL THEN
                    INSERT INTO bodies AS b (body, refs) VALUES (p_bodies[d], 0) RETURNING b.id INTO v_body;
                END IF;
                INSERT INTO messages AS m (recipient, seq, sender, msg_id, kind, ts, size, body_id)
                    VALUES (v_rcpt, h_next, v_sender, p_ids[d], p_kinds[d], p_ts[d], v_size, v_body);
            END IF;
            IF v_stored = 0 THEN v_new_disk := v_new_disk + v_size; END IF;
            v_stored := v_stored + 1;
            v_prior_rcpts := v_prior_rcpts || v_rcpt; v_prior_seqs := v_prior_seqs || h_next;
            u_senders := u_senders || v_sender; u_bytes := u_bytes || v_size::BIGINT;
            u_hours := u_hours || (p_ts[d] / 3600000);
            status := 0; RETURN NEXT;
        END LOOP;
        IF v_body IS NOT NULL THEN
            UPDATE bodies b SET refs = v_stored WHERE b.id = v_body;
        END IF;
        IF cardinality(v_prior_rcpts) = 0 THEN  -- nothing accepted: remember nothing (no growth
            DELETE FROM sent x WHERE x.sender = v_sender AND x.msg_id = p_ids[d];  -- from refused sends)
        ELSE
            UPDATE sent x SET recipients = v_prior_rcpts, seqs = v_prior_seqs
                WHERE x.sender = v_sender AND x.msg_id = p_ids[d];
        END IF;
    END LOOP;
    -- 4. counters, sorted, last
    INSERT INTO usage AS u (sender, hour, messages, bytes)
        SELECT t.s, t.h, count(*), sum(t.b) FROM unnest(u_senders, u_bytes, u_hours) AS t(s, b, h)
        GROUP BY t.s, t.h ORDER BY t.s, t.h
        ON CONFLICT (sender, hour) DO UPDATE SET messages = u.messages + excluded.messages,
                                                 bytes = u.bytes + excluded.bytes;
    IF v_new_disk > 0 THEN
        UPDATE disk_usage u SET bytes = u.bytes + v_new_disk WHERE u.shard = v_shard;
    END IF;
END $$;
""",
    # Acks (p_all false: the given (recipient, seq) pairs) and account deletion (p_all true: every
    # message of p_rcpts). Heads are locked first; returns how many messages were deleted.
    """
CREATE FUNCTION cp_remove(p_rcpts TEXT[], p_seqs BIGINT[], p_all BOOLEAN) RETURNS INTEGER
LANGUAGE plpgsql AS $$
#variable_conflict error
DECLARE
    g_rcpts TEXT[];
    g_senders TEXT[];
    g_sizes INTEGER[];
    g_bodies BIGINT[];
    v_total INTEGER;
    v_freed BIGINT;
    v_dead BIGINT;
    v_shard SMALLINT := floor(random() * 16)::SMALLINT;
BEGIN
    PERFORM 1 FROM mailbox_heads h WHERE h.recipient = ANY(p_rcpts) ORDER BY h.recipient FOR UPDATE;
    IF p_all THEN
        WITH gone AS (DELETE FROM messages m WHERE m.recipient = ANY(p_rcpts)
                      RETURNING m.recipient, m.sender, m.size, m.body_id)
        SELECT array_agg(g.recipient), array_agg(g.sender), array_agg(g.size), array_agg(g.body_id)
            INTO g_rcpts, g_senders, g_sizes, g_bodies FROM gone g;
    ELSE
        WITH gone AS (DELETE FROM messages m USING unnest(p_rcpts, p_seqs) AS a(r, s)
                      WHERE m.recipient = a.r AND m.seq = a.s
                      RETURNING m.recipient, m.sender, m.size, m.body_id)
        SELECT array_agg(g.recipient), array_agg(g.sender), array_agg(g.size), array_agg(g.body_id)
            INTO g_rcpts, g_senders, g_sizes, g_bodies FROM gone g;
    END IF;
    v_total := coalesce(array_length(g_rcpts, 1), 0);
    IF v_total = 0 THEN RETURN 0; END IF;
    UPDATE mailbox_heads h SET queued = h.queued - g.n, bytes = h.bytes - g.b
        FROM (SELECT t.r, count(*) AS n, sum(t.z) AS b FROM unnest(g_rcpts, g_sizes) AS t(r, z)
              GROUP BY t.r) g
        WHERE h.recipient = g.r;
    UPDATE mailbox_senders s SET queued = s.queued - g.n, bytes = s.bytes - g.b
        FROM (SELECT t.r, t.x, count(*) AS n, sum(t.z) AS b
              FROM unnest(g_rcpts, g_senders, g_sizes) AS t(r, x, z) GROUP BY t.r, t.x) g
        WHERE s.recipient = g.r AND s.sender = g.x;
    DELETE FROM mailbox_senders s WHERE s.recipient = ANY(g_rcpts) AND s.queued <= 0;
    SELECT coalesce(sum(t.z), 0) INTO v_freed FROM unnest(g_sizes, g_bodies) AS t(z, b) WHERE t.b IS NULL;
    PERFORM 1 FROM bodies b WHERE b.id = ANY(g_bodies) ORDER BY b.id FOR UPDATE;
    UPDATE bodies b SET refs = b.refs - g.n
        FROM (SELECT t.b, count(*) AS n FROM unnest(g_bodies) AS t(b) WHERE t.b IS NOT NULL GROUP BY t.b) g
        WHERE b.id = g.b;
    WITH dead AS (DELETE FROM bodies b WHERE b.id = ANY(g_bodies) AND b.refs <= 0
                  RETURNING length(b.body) AS n)
    SELECT coalesce(sum(dead.n), 0) INTO v_dead FROM dead;
    IF v_freed + v_dead > 0 THEN
        UPDATE disk_usage u SET bytes = u.bytes - (v_freed + v_dead) WHERE u.shard = v_shard;
    END IF;
    RETURN v_total;
END $$;
""",
)

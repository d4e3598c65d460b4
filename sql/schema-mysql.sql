CREATE TABLE alembic_version (
    version_num VARCHAR(32) NOT NULL, 
    CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)
);

-- Running upgrade  -> 0001

CREATE TABLE event_outbox (
    id BIGINT NOT NULL AUTO_INCREMENT, 
    routing_key VARCHAR(255) NOT NULL, 
    type VARCHAR(64) NOT NULL, 
    body BLOB NOT NULL, 
    created_at DATETIME(6) NOT NULL, 
    published_at DATETIME(6), 
    CONSTRAINT pk_event_outbox PRIMARY KEY (id)
)ENGINE=InnoDB CHARSET=utf8mb4 COLLATE utf8mb4_bin;

CREATE INDEX ix_event_outbox_published_at_id ON event_outbox (published_at, id);

CREATE TABLE handled_messages (
    message_id VARCHAR(64) NOT NULL, 
    handled_at DATETIME(6) NOT NULL, 
    CONSTRAINT pk_handled_messages PRIMARY KEY (message_id)
)ENGINE=InnoDB CHARSET=utf8mb4 COLLATE utf8mb4_bin;

CREATE INDEX ix_handled_messages_handled_at ON handled_messages (handled_at);

CREATE TABLE hosts (
    id INTEGER NOT NULL AUTO_INCREMENT, 
    guid VARCHAR(64) NOT NULL, 
    name VARCHAR(255) NOT NULL, 
    status VARCHAR(16) NOT NULL, 
    last_ping DATETIME(6), 
    cpus INTEGER NOT NULL, 
    memory_mb BIGINT NOT NULL, 
    hypervisor_version VARCHAR(64) NOT NULL, 
    created_at DATETIME(6) NOT NULL, 
    updated_at DATETIME(6) NOT NULL, 
    CONSTRAINT pk_hosts PRIMARY KEY (id), 
    CONSTRAINT ck_hosts_status CHECK (status IN ('Up', 'Disconnected', 'Down', 'Maintenance')), 
    CONSTRAINT uq_hosts_guid UNIQUE (guid)
)ENGINE=InnoDB CHARSET=utf8mb4 COLLATE utf8mb4_bin;

CREATE TABLE service_offerings (
    id INTEGER NOT NULL AUTO_INCREMENT, 
    name VARCHAR(255) NOT NULL, 
    cpus INTEGER NOT NULL, 
    memory_mb BIGINT NOT NULL, 
    migration_policy VARCHAR(16) NOT NULL, 
    created_at DATETIME(6) NOT NULL, 
    CONSTRAINT pk_service_offerings PRIMARY KEY (id), 
    CONSTRAINT ck_service_offerings_migration_policy CHECK (migration_policy IN ('forbid', 'detach-attach')), 
    CONSTRAINT uq_service_offerings_name UNIQUE (name)
)ENGINE=InnoDB CHARSET=utf8mb4 COLLATE utf8mb4_bin;

CREATE TABLE service_offering_pci_requests (
    id INTEGER NOT NULL AUTO_INCREMENT, 
    offering_id INTEGER NOT NULL, 
    name VARCHAR(64) NOT NULL, 
    count INTEGER NOT NULL, 
    CONSTRAINT pk_service_offering_pci_requests PRIMARY KEY (id), 
    CONSTRAINT ck_service_offering_pci_requests_count_positive CHECK (count > 0), 
    CONSTRAINT fk_service_offering_pci_requests_offering_id FOREIGN KEY(offering_id) REFERENCES service_offerings (id) ON DELETE CASCADE, 
    CONSTRAINT uq_service_offering_pci_requests_offering_id_name UNIQUE (offering_id, name)
)ENGINE=InnoDB CHARSET=utf8mb4 COLLATE utf8mb4_bin;

CREATE TABLE vm_instances (
    id INTEGER NOT NULL AUTO_INCREMENT, 
    uuid VARCHAR(36) NOT NULL, 
    name VARCHAR(255) NOT NULL, 
    offering_id INTEGER NOT NULL, 
    host_id INTEGER, 
    last_host_id INTEGER, 
    state VARCHAR(16) NOT NULL, 
    update_count BIGINT NOT NULL, 
    cpus INTEGER NOT NULL, 
    memory_mb BIGINT NOT NULL, 
    created_at DATETIME(6) NOT NULL, 
    updated_at DATETIME(6) NOT NULL, 
    CONSTRAINT pk_vm_instances PRIMARY KEY (id), 
    CONSTRAINT ck_vm_instances_state CHECK (state IN ('Stopped', 'Starting', 'Running', 'Stopping', 'Migrating', 'Destroyed', 'Error')), 
    CONSTRAINT fk_vm_instances_host_id FOREIGN KEY(host_id) REFERENCES hosts (id), 
    CONSTRAINT fk_vm_instances_last_host_id FOREIGN KEY(last_host_id) REFERENCES hosts (id), 
    CONSTRAINT fk_vm_instances_offering_id FOREIGN KEY(offering_id) REFERENCES service_offerings (id), 
    CONSTRAINT uq_vm_instances_uuid UNIQUE (uuid)
)ENGINE=InnoDB CHARSET=utf8mb4 COLLATE utf8mb4_bin;

CREATE INDEX ix_vm_instances_host_id_state ON vm_instances (host_id, state);

CREATE INDEX ix_vm_instances_last_host_id ON vm_instances (last_host_id);

CREATE INDEX ix_vm_instances_offering_id ON vm_instances (offering_id);

CREATE TABLE jobs (
    id BIGINT NOT NULL AUTO_INCREMENT, 
    kind VARCHAR(32) NOT NULL, 
    state VARCHAR(16) NOT NULL, 
    vm_id INTEGER, 
    step VARCHAR(64) NOT NULL, 
    details TEXT NOT NULL, 
    claimed_by VARCHAR(64), 
    deadline DATETIME(6), 
    payload TEXT NOT NULL, 
    created_at DATETIME(6) NOT NULL, 
    updated_at DATETIME(6) NOT NULL, 
    finished_at DATETIME(6), 
    CONSTRAINT pk_jobs PRIMARY KEY (id), 
    CONSTRAINT ck_jobs_state CHECK (state IN ('pending', 'running', 'succeeded', 'failed')), 
    CONSTRAINT fk_jobs_vm_id FOREIGN KEY(vm_id) REFERENCES vm_instances (id)
)ENGINE=InnoDB CHARSET=utf8mb4 COLLATE utf8mb4_bin;

CREATE INDEX ix_jobs_state_deadline ON jobs (state, deadline);

CREATE INDEX ix_jobs_vm_id ON jobs (vm_id);

CREATE TABLE op_host_pci_devices (
    id INTEGER NOT NULL AUTO_INCREMENT, 
    host_id INTEGER NOT NULL, 
    name VARCHAR(64) NOT NULL, 
    domain VARCHAR(4) NOT NULL, 
    bus VARCHAR(2) NOT NULL, 
    slot VARCHAR(2) NOT NULL, 
    `function` VARCHAR(1) NOT NULL, 
    instance_id INTEGER, 
    reserved_for INTEGER, 
    vendor_id VARCHAR(8) NOT NULL, 
    product_id VARCHAR(8) NOT NULL, 
    iommu_group INTEGER, 
    state VARCHAR(16) NOT NULL, 
    created_at DATETIME(6) NOT NULL, 
    updated_at DATETIME(6) NOT NULL, 
    CONSTRAINT pk_op_host_pci_devices PRIMARY KEY (id), 
    CONSTRAINT ck_op_host_pci_devices_state CHECK (state IN ('free', 'allocated', 'reserved', 'quarantined', 'disabled', 'removed')), 
    CONSTRAINT fk_op_host_pci_devices_host_id FOREIGN KEY(host_id) REFERENCES hosts (id), 
    CONSTRAINT fk_op_host_pci_devices_instance_id FOREIGN KEY(instance_id) REFERENCES vm_instances (id), 
    CONSTRAINT fk_op_host_pci_devices_reserved_for FOREIGN KEY(reserved_for) REFERENCES vm_instances (id), 
    CONSTRAINT uq_op_host_pci_devices_host_id_domain_bus_slot_function UNIQUE (host_id, domain, bus, slot, `function`)
)ENGINE=InnoDB CHARSET=utf8mb4 COLLATE utf8mb4_bin;

CREATE INDEX ix_op_host_pci_devices_host_id_name_state ON op_host_pci_devices (host_id, name, state);

CREATE INDEX ix_op_host_pci_devices_state_name_host_id ON op_host_pci_devices (state, name, host_id);

CREATE INDEX ix_op_host_pci_devices_instance_id ON op_host_pci_devices (instance_id);

CREATE INDEX ix_op_host_pci_devices_reserved_for ON op_host_pci_devices (reserved_for);

INSERT INTO alembic_version (version_num) VALUES ('0001');

-- Running upgrade 0001 -> 0002

ALTER TABLE hosts ADD COLUMN migration_uri VARCHAR(1024) NOT NULL DEFAULT '';

UPDATE alembic_version SET version_num='0002' WHERE alembic_version.version_num = '0001';

-- Running upgrade 0002 -> 0003

ALTER TABLE jobs ADD COLUMN command_id VARCHAR(64);

ALTER TABLE jobs ADD COLUMN request_id VARCHAR(64);

CREATE INDEX ix_jobs_command_id ON jobs (command_id);

CREATE INDEX ix_jobs_request_id ON jobs (request_id);

UPDATE alembic_version SET version_num='0003' WHERE alembic_version.version_num = '0002';

-- Running upgrade 0003 -> 0004

ALTER TABLE event_outbox ADD COLUMN message_id VARCHAR(32);

CREATE UNIQUE INDEX ix_event_outbox_message_id ON event_outbox (message_id);

ALTER TABLE jobs ADD COLUMN command_host VARCHAR(64);

ALTER TABLE hosts ADD COLUMN foreign_domains INTEGER NOT NULL DEFAULT '0';

ALTER TABLE hosts ADD COLUMN foreign_domain_names TEXT;

UPDATE alembic_version SET version_num='0004' WHERE alembic_version.version_num = '0003';

-- Running upgrade 0004 -> 0005

ALTER TABLE hosts ADD COLUMN report_boot_id VARCHAR(64);

ALTER TABLE hosts ADD COLUMN report_seq BIGINT;

ALTER TABLE hosts ADD COLUMN retired_boot_id VARCHAR(64);

ALTER TABLE vm_instances ADD COLUMN answer_boot_id VARCHAR(64);

ALTER TABLE vm_instances ADD COLUMN answer_seq BIGINT;

UPDATE alembic_version SET version_num='0005' WHERE alembic_version.version_num = '0004';

-- Running upgrade 0005 -> 0006

ALTER TABLE op_host_pci_devices ADD COLUMN vendor VARCHAR(255) NOT NULL DEFAULT '';

ALTER TABLE op_host_pci_devices ADD COLUMN product VARCHAR(255) NOT NULL DEFAULT '';

ALTER TABLE op_host_pci_devices ADD COLUMN class_code INTEGER NOT NULL DEFAULT '0';

ALTER TABLE op_host_pci_devices ADD COLUMN numa_node INTEGER;

ALTER TABLE op_host_pci_devices ADD COLUMN iommu_members VARCHAR(3328) NOT NULL DEFAULT '';

ALTER TABLE op_host_pci_devices ADD COLUMN physical_function VARCHAR(12);

ALTER TABLE op_host_pci_devices ADD COLUMN virtual_functions VARCHAR(3328) NOT NULL DEFAULT '';

ALTER TABLE op_host_pci_devices ADD COLUMN driver VARCHAR(64) NOT NULL DEFAULT '';

ALTER TABLE op_host_pci_devices ADD COLUMN disabled_reason VARCHAR(255) NOT NULL DEFAULT '';

UPDATE alembic_version SET version_num='0006' WHERE alembic_version.version_num = '0005';

-- Running upgrade 0006 -> 0007

ALTER TABLE op_host_pci_devices DROP CHECK ck_op_host_pci_devices_state;

ALTER TABLE op_host_pci_devices ADD CONSTRAINT ck_op_host_pci_devices_state CHECK (state IN ('free', 'allocated', 'reserved', 'quarantined', 'disabled', 'removed', 'unavailable', 'cleaning'));

ALTER TABLE op_host_pci_devices CHANGE disabled_reason reason VARCHAR(255) NOT NULL DEFAULT '';

ALTER TABLE op_host_pci_devices ADD COLUMN withheld VARCHAR(255) NOT NULL DEFAULT '';

ALTER TABLE service_offerings ADD COLUMN numa_policy VARCHAR(16) NOT NULL DEFAULT 'none';

ALTER TABLE service_offerings ADD CONSTRAINT ck_service_offerings_numa_policy CHECK (numa_policy IN ('required', 'preferred', 'none'));

ALTER TABLE vm_instances ADD COLUMN numa_node INTEGER;

UPDATE alembic_version SET version_num='0007' WHERE alembic_version.version_num = '0006';

-- Running upgrade 0007 -> 0008

CREATE TABLE domain_templates (
    id INTEGER NOT NULL AUTO_INCREMENT, 
    name VARCHAR(64) NOT NULL, 
    version INTEGER NOT NULL, 
    xml MEDIUMTEXT NOT NULL, 
    created_at DATETIME(6) NOT NULL, 
    CONSTRAINT pk_domain_templates PRIMARY KEY (id), 
    CONSTRAINT uq_domain_templates_name_version UNIQUE (name, version)
)ENGINE=InnoDB CHARSET=utf8mb4 COLLATE utf8mb4_bin;

ALTER TABLE service_offerings ADD COLUMN template_name VARCHAR(64);

ALTER TABLE vm_instances ADD COLUMN template_version INTEGER;

ALTER TABLE vm_instances ADD COLUMN console_path VARCHAR(1024);

UPDATE alembic_version SET version_num='0008' WHERE alembic_version.version_num = '0007';

-- Running upgrade 0008 -> 0009

ALTER TABLE hosts DROP CHECK ck_hosts_status;

ALTER TABLE hosts MODIFY status VARCHAR(32) NOT NULL;

ALTER TABLE hosts ADD CONSTRAINT ck_hosts_status CHECK (status IN ('Up', 'Disconnected', 'Down', 'PrepareForMaintenance', 'Maintenance'));

ALTER TABLE hosts ADD COLUMN status_reason VARCHAR(1024) NOT NULL DEFAULT '';

ALTER TABLE hosts ADD COLUMN reset_on_release BOOL NOT NULL DEFAULT false;

UPDATE alembic_version SET version_num='0009' WHERE alembic_version.version_num = '0008';

-- Running upgrade 0009 -> 0010

ALTER TABLE hosts ADD COLUMN device_epoch BIGINT NOT NULL DEFAULT '0';

ALTER TABLE hosts ADD COLUMN device_rules BOOL NOT NULL DEFAULT false;

UPDATE alembic_version SET version_num='0010' WHERE alembic_version.version_num = '0009';

-- Running upgrade 0010 -> 0011

ALTER TABLE hosts ADD COLUMN reconciled_digest VARCHAR(64);

UPDATE alembic_version SET version_num='0011' WHERE alembic_version.version_num = '0010';

-- Running upgrade 0011 -> 0012

ALTER TABLE hosts ADD COLUMN used_cpus INTEGER NOT NULL DEFAULT '0';

ALTER TABLE hosts ADD COLUMN used_memory_mb BIGINT NOT NULL DEFAULT '0';

UPDATE hosts SET used_cpus = COALESCE((SELECT SUM(v.cpus) FROM vm_instances v WHERE v.host_id = hosts.id AND v.state IN ('Starting', 'Running', 'Stopping', 'Migrating')), 0), used_memory_mb = COALESCE((SELECT SUM(v.memory_mb) FROM vm_instances v WHERE v.host_id = hosts.id AND v.state IN ('Starting', 'Running', 'Stopping', 'Migrating')), 0);

CREATE INDEX ix_hosts_status_id_cpus_used_cpus_memory_mb_used_memory_mb ON hosts (status, id, cpus, used_cpus, memory_mb, used_memory_mb);

UPDATE alembic_version SET version_num='0012' WHERE alembic_version.version_num = '0011';

-- Running upgrade 0012 -> 0013

CREATE TABLE host_blocks (
    block INTEGER NOT NULL, 
    cells BIGINT NOT NULL DEFAULT '0', 
    raised BIGINT NOT NULL DEFAULT '0', 
    CONSTRAINT pk_host_blocks PRIMARY KEY (block)
)ENGINE=InnoDB CHARSET=utf8mb4 COLLATE utf8mb4_bin;

INSERT INTO host_blocks (block, cells, raised) SELECT DISTINCT id >> 8, 72057594037927935, 0 FROM hosts;

UPDATE alembic_version SET version_num='0013' WHERE alembic_version.version_num = '0012';


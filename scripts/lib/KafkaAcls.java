// Creates or deletes ACLs with the real Java admin client, from lines on standard input:
//   <principal> <operation> <resource type> <pattern type> <resource name>
// e.g. `User:saga READ TOPIC LITERAL orders.created` (names as in the Java enums AclOperation,
// ResourceType and PatternType; `#` starts a comment). Every ACL allows, from any host.
// With `scram`, the lines are `<user> <password>` instead: each user's SCRAM-SHA-512 credential is
// set (created, or its password changed), the password never on a command line.
// Run as a single-file program:
//   java -cp '<kafka lib>/*' KafkaAcls.java <bootstrap> <client.properties> add|remove|scram < lines
import java.io.BufferedReader;
import java.io.FileReader;
import java.io.InputStreamReader;
import java.io.Reader;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.common.acl.AccessControlEntry;
import org.apache.kafka.common.acl.AclBinding;
import org.apache.kafka.common.acl.AclOperation;
import org.apache.kafka.common.acl.AclPermissionType;
import org.apache.kafka.common.resource.PatternType;
import org.apache.kafka.common.resource.ResourcePattern;
import org.apache.kafka.common.resource.ResourceType;

public class KafkaAcls {
    public static void main(String[] args) throws Exception {
        Properties props = new Properties();
        try (Reader in = new FileReader(args[1])) {
            props.load(in);
        }
        props.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, args[0]);
        if (args[2].equals("scram")) {
            scram(props);
            return;
        }
        boolean add = args[2].equals("add");
        List<AclBinding> bindings = new ArrayList<>();
        BufferedReader lines = new BufferedReader(new InputStreamReader(System.in));
        for (String line = lines.readLine(); line != null; line = lines.readLine()) {
            line = line.replaceAll("#.*", "").trim();
            if (line.isEmpty()) {
                continue;
            }
            String[] f = line.split("\\s+");
            if (f.length != 5) {
                System.err.println("not '<principal> <operation> <resource type> <pattern type> <name>': " + line);
                System.exit(2);
            }
            bindings.add(new AclBinding(
                    new ResourcePattern(ResourceType.fromString(f[2]), f[4], PatternType.fromString(f[3])),
                    new AccessControlEntry(f[0], "*", AclOperation.fromString(f[1]), AclPermissionType.ALLOW)));
        }
        try (Admin admin = Admin.create(props)) {
            if (add) {
                admin.createAcls(bindings).all().get(30, TimeUnit.SECONDS);
            } else {
                List<org.apache.kafka.common.acl.AclBindingFilter> filters = new ArrayList<>();
                for (AclBinding b : bindings) {
                    filters.add(b.toFilter());
                }
                admin.deleteAcls(filters).all().get(30, TimeUnit.SECONDS);
            }
        }
        System.out.println((add ? "added " : "removed ") + bindings.size() + " ACL(s)");
    }

    static void scram(Properties props) throws Exception {
        List<org.apache.kafka.clients.admin.UserScramCredentialAlteration> changes = new ArrayList<>();
        BufferedReader lines = new BufferedReader(new InputStreamReader(System.in));
        for (String line = lines.readLine(); line != null; line = lines.readLine()) {
            String[] f = line.trim().split("\\s+");
            if (f.length != 2) {
                System.err.println("not '<user> <password>' (line not shown)");
                System.exit(2);
            }
            changes.add(new org.apache.kafka.clients.admin.UserScramCredentialUpsertion(f[0],
                    new org.apache.kafka.clients.admin.ScramCredentialInfo(
                            org.apache.kafka.clients.admin.ScramMechanism.SCRAM_SHA_512, 4096),
                    f[1]));
        }
        try (Admin admin = Admin.create(props)) {
            admin.alterUserScramCredentials(changes).all().get(30, TimeUnit.SECONDS);
        }
        System.out.println("set " + changes.size() + " SCRAM credential(s)");
    }
}

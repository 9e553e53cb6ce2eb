// godiff reads an image archive the way the loaders do, with Go's archive/tar and encoding/json,
// and prints as JSON what each would load. It is the reference side of tests/test_differential.py.
//
//	docker:     Docker's graph-driver loader: the archive extracted (paths cleaned, a later member
//	            replacing an earlier one, breakouts refused), then manifest.json, its configs and
//	            layers read through symlinks inside the root.
//	containerd: containerd's importer (docker load with the containerd store, ctr import): the
//	            stream read once, regular files stored by digest, index.json followed by digest when
//	            oci-layout is present, else manifest.json with one level of symlinks.
package main

import (
	"archive/tar"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"strings"
)

type entry struct {
	kind byte // 'f' file, 'd' directory, 'l' symlink, 'o' device or fifo
	link string
	sum  string
	data []byte
}

type image struct {
	Config  string   `json:"config"`
	Tags    []string `json:"tags"`
	DiffIDs []string `json:"diff_ids"`
	Layers  []string `json:"layers"`
}

type view struct {
	Error  string  `json:"error,omitempty"`
	Images []image `json:"images"`
}

type result struct {
	TarError     string `json:"tar_error,omitempty"`
	ExtractError string `json:"extract_error,omitempty"`
	Members      int    `json:"members"`
	Docker       *view  `json:"docker,omitempty"`
	Containerd   *view  `json:"containerd,omitempty"`
}

const keepLimit = 20 << 20

type archive struct {
	tree                   map[string]*entry // docker's extracted tree
	blobs                  map[string]*entry // containerd: cleaned name -> last regular file
	symlinks               map[string]string // containerd: raw name -> path.Join(dir, link)
	content                map[string][]byte // containerd: digest -> bytes
	layout                 []byte
	manifest               []byte
	hasLayout, hasManifest bool
}

func digestOf(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

func (a *archive) removeAll(key string) {
	for k := range a.tree {
		if k == key || strings.HasPrefix(k, key+"/") {
			delete(a.tree, k)
		}
	}
}

// extract applies one member to the tree as pkg/archive's Unpack does.
func (a *archive) extract(hdr *tar.Header, data []byte, sum string) error {
	name := path.Clean(hdr.Name)
	if name == ".." || strings.HasPrefix(name, "../") {
		return fmt.Errorf("%q is outside of the root", hdr.Name)
	}
	key := strings.TrimPrefix(path.Clean("/"+name), "/")
	if key == "" {
		return nil
	}
	for p := path.Dir(key); p != "."; p = path.Dir(p) {
		if e, ok := a.tree[p]; ok && e.kind != 'd' {
			return fmt.Errorf("%q: parent %q is not a directory", hdr.Name, p)
		}
	}
	for p := path.Dir(key); p != "."; p = path.Dir(p) {
		a.tree[p] = &entry{kind: 'd'}
	}
	if old, ok := a.tree[key]; ok && !(old.kind == 'd' && hdr.Typeflag == tar.TypeDir) {
		a.removeAll(key)
	}
	switch hdr.Typeflag {
	case tar.TypeDir:
		if _, ok := a.tree[key]; !ok {
			a.tree[key] = &entry{kind: 'd'}
		}
	case tar.TypeReg, tar.TypeRegA:
		a.tree[key] = &entry{kind: 'f', sum: sum, data: data}
	case tar.TypeSymlink:
		target := path.Join("/R", path.Dir(key), hdr.Linkname)
		if target != "/R" && !strings.HasPrefix(target, "/R/") {
			return fmt.Errorf("%q: symlink to %q is outside of the root", hdr.Name, hdr.Linkname)
		}
		a.tree[key] = &entry{kind: 'l', link: hdr.Linkname}
	case tar.TypeLink:
		target := path.Join("/R", hdr.Linkname)
		if !strings.HasPrefix(target, "/R/") {
			return fmt.Errorf("%q: hard link to %q is outside of the root", hdr.Name, hdr.Linkname)
		}
		t, ok := a.tree[strings.TrimPrefix(target, "/R/")]
		if !ok || t.kind == 'd' {
			return fmt.Errorf("%q: hard link target %q missing or a directory", hdr.Name, hdr.Linkname)
		}
		copied := *t
		a.tree[key] = &copied
	case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
		a.tree[key] = &entry{kind: 'o'}
	default:
		return fmt.Errorf("%q: unhandled tar header type %d", hdr.Name, hdr.Typeflag)
	}
	return nil
}

// lookup follows symlinks in every component within the root, as FollowSymlinkInScope does.
func (a *archive) lookup(p string) (*entry, error) {
	todo := strings.Split(strings.TrimPrefix(path.Clean("/"+p), "/"), "/")
	cur := ""
	links := 0
	for len(todo) > 0 {
		c := todo[0]
		todo = todo[1:]
		if c == "" || c == "." {
			continue
		}
		if c == ".." {
			if cur != "" {
				cur = strings.TrimPrefix(path.Dir("/"+cur), "/")
			}
			continue
		}
		next := strings.TrimPrefix(path.Join(cur, c), "/")
		e, ok := a.tree[next]
		if ok && e.kind == 'l' {
			links++
			if links > 255 {
				return nil, fmt.Errorf("too many links at %q", p)
			}
			if strings.HasPrefix(e.link, "/") {
				cur = ""
			}
			todo = append(strings.Split(e.link, "/"), todo...)
			continue
		}
		cur = next
	}
	e, ok := a.tree[cur]
	if !ok {
		return nil, fmt.Errorf("%q: no such file", p)
	}
	if e.kind != 'f' {
		return nil, fmt.Errorf("%q: not a regular file", p)
	}
	return e, nil
}

type manifestItem struct {
	Config   string
	RepoTags []string
	Layers   []string
}

type imageConfig struct {
	RootFS *struct {
		DiffIDs []string `json:"diff_ids"`
	} `json:"rootfs"`
}

func diffIDs(data []byte) ([]string, error) {
	var cfg imageConfig
	if err := json.Unmarshal(data, &cfg); err != nil {
		return nil, err
	}
	if cfg.RootFS == nil {
		return nil, errors.New("config without rootfs")
	}
	return cfg.RootFS.DiffIDs, nil
}

func (a *archive) dockerView() *view {
	v := &view{Images: []image{}}
	fail := func(err error) *view { v.Error = err.Error(); v.Images = nil; return v }
	m, err := a.lookup("manifest.json")
	if err != nil {
		return fail(err)
	}
	var items []manifestItem
	if err := json.NewDecoder(strings.NewReader(string(m.data))).Decode(&items); err != nil {
		return fail(err)
	}
	if items == nil {
		return fail(errors.New("invalid manifest, manifest cannot be null"))
	}
	for _, it := range items {
		c, err := a.lookup(it.Config)
		if err != nil {
			return fail(err)
		}
		ids, err := diffIDs(c.data)
		if err != nil {
			return fail(err)
		}
		if len(ids) != len(it.Layers) {
			return fail(errors.New("invalid manifest, layers length mismatch"))
		}
		im := image{Config: c.sum, Tags: it.RepoTags, DiffIDs: ids, Layers: []string{}}
		if im.Tags == nil {
			im.Tags = []string{}
		}
		for _, l := range it.Layers {
			e, err := a.lookup(l)
			if err != nil {
				return fail(err)
			}
			im.Layers = append(im.Layers, e.sum)
		}
		v.Images = append(v.Images, im)
	}
	return v
}

type descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Annotations map[string]string `json:"annotations"`
}

type ociDoc struct {
	MediaType string       `json:"mediaType"`
	Manifests []descriptor `json:"manifests"`
	Config    *descriptor  `json:"config"`
	Layers    []descriptor `json:"layers"`
}

const (
	indexType = "application/vnd.oci.image.index.v1+json"
	listType  = "application/vnd.docker.distribution.manifest.list.v2+json"
)

func (a *archive) walk(d descriptor, tag string, depth int, v *view) error {
	if depth > 16 {
		return errors.New("indexes nested too deep")
	}
	data, ok := a.content[d.Digest]
	if !ok {
		return nil // WithSkipMissing
	}
	var doc ociDoc
	if err := json.Unmarshal(data, &doc); err != nil {
		return err
	}
	if doc.MediaType != "" && d.MediaType != "" && doc.MediaType != d.MediaType {
		return fmt.Errorf("unexpected media type %s for %s", doc.MediaType, d.Digest)
	}
	mt := d.MediaType
	if mt == "" {
		mt = doc.MediaType
	}
	if mt == indexType || mt == listType || (mt == "" && doc.Manifests != nil) {
		for _, child := range doc.Manifests {
			if err := a.walk(child, tag, depth+1, v); err != nil {
				return err
			}
		}
		return nil
	}
	if d.Annotations["vnd.docker.reference.type"] == "attestation-manifest" || doc.Config == nil {
		return nil
	}
	cfg, ok := a.content[doc.Config.Digest]
	if !ok {
		return fmt.Errorf("config %s not found", doc.Config.Digest)
	}
	ids, err := diffIDs(cfg)
	if err != nil {
		return err
	}
	im := image{Config: doc.Config.Digest, Tags: []string{}, DiffIDs: ids, Layers: []string{}}
	if tag != "" {
		im.Tags = []string{tag}
	}
	for _, l := range doc.Layers {
		im.Layers = append(im.Layers, l.Digest)
	}
	v.Images = append(v.Images, im)
	return nil
}

func (a *archive) containerdView() *view {
	v := &view{Images: []image{}}
	fail := func(err error) *view { v.Error = err.Error(); v.Images = nil; return v }
	if a.hasLayout {
		var layout struct {
			Version string `json:"imageLayoutVersion"`
		}
		if err := json.NewDecoder(strings.NewReader(string(a.layout))).Decode(&layout); err != nil {
			return fail(err)
		}
		if layout.Version != "" {
			if layout.Version != "1.0.0" {
				return fail(errors.New("unsupported OCI version"))
			}
			idx, ok := a.blobs["index.json"]
			if !ok {
				return fail(errors.New("missing index.json in OCI layout"))
			}
			var index ociDoc
			if err := json.Unmarshal(idx.data, &index); err != nil {
				return fail(err)
			}
			for _, d := range index.Manifests {
				tag := d.Annotations["io.containerd.image.name"]
				if tag == "" {
					tag = d.Annotations["org.opencontainers.image.ref.name"]
				}
				if err := a.walk(d, tag, 0, v); err != nil {
					return fail(err)
				}
			}
			return v
		}
	}
	if !a.hasManifest {
		return fail(errors.New("unrecognized image format"))
	}
	var items []manifestItem
	if err := json.NewDecoder(strings.NewReader(string(a.manifest))).Decode(&items); err != nil {
		return fail(err)
	}
	for name, target := range a.symlinks {
		if b, ok := a.blobs[target]; ok {
			a.blobs[name] = b
		}
	}
	for _, it := range items {
		c, ok := a.blobs[it.Config]
		if !ok {
			return fail(fmt.Errorf("image config %q not found", it.Config))
		}
		ids, err := diffIDs(c.data)
		if err != nil {
			return fail(err)
		}
		im := image{Config: c.sum, Tags: it.RepoTags, DiffIDs: ids, Layers: []string{}}
		if im.Tags == nil {
			im.Tags = []string{}
		}
		for _, l := range it.Layers {
			b, ok := a.blobs[l]
			if !ok {
				return fail(fmt.Errorf("layer %q not found", l))
			}
			im.Layers = append(im.Layers, b.sum)
		}
		v.Images = append(v.Images, im)
	}
	return v
}

func read(r io.Reader) result {
	a := &archive{tree: map[string]*entry{}, blobs: map[string]*entry{}, symlinks: map[string]string{},
		content: map[string][]byte{}}
	res := result{}
	tr := tar.NewReader(r)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			res.TarError = err.Error()
			return res
		}
		res.Members++
		if hdr.Typeflag == tar.TypeXGlobalHeader {
			continue
		}
		var data []byte
		sum := ""
		if hdr.Typeflag == tar.TypeReg || hdr.Typeflag == tar.TypeRegA {
			h := sha256.New()
			var kept strings.Builder
			w := io.Writer(h)
			if hdr.Size <= keepLimit {
				w = io.MultiWriter(h, &kept)
			}
			if _, err := io.Copy(w, tr); err != nil {
				res.TarError = err.Error()
				return res
			}
			sum = "sha256:" + hex.EncodeToString(h.Sum(nil))
			data = []byte(kept.String())
			clean := path.Clean(hdr.Name)
			switch clean {
			case "oci-layout":
				a.layout, a.hasLayout = data, true
			case "manifest.json":
				a.manifest, a.hasManifest = data, true
			default:
				a.blobs[clean] = &entry{kind: 'f', sum: sum, data: data}
			}
			a.content[sum] = data
		}
		if hdr.Typeflag == tar.TypeSymlink {
			a.symlinks[hdr.Name] = path.Join(path.Dir(hdr.Name), hdr.Linkname)
		}
		if res.ExtractError == "" {
			if err := a.extract(hdr, data, sum); err != nil {
				res.ExtractError = err.Error()
			}
		}
	}
	if res.ExtractError == "" {
		res.Docker = a.dockerView()
	}
	res.Containerd = a.containerdView()
	return res
}

func main() {
	out := json.NewEncoder(os.Stdout)
	for _, name := range os.Args[1:] {
		f, err := os.Open(name)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(3)
		}
		res := read(f)
		f.Close()
		if err := out.Encode(res); err != nil {
			os.Exit(3)
		}
	}
}
